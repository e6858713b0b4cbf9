"""3D-parallel family training: mesh, tensor_parallel, fsdp, pipeline (stage), checkpoint, train, loop."""
