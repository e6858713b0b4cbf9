"""N-process training layouts: mesh, tensor_parallel, fsdp, pipeline and stage, assembled by layout."""
