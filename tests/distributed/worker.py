"""Run by torchrun from the distributed tests: train a tiny family under one layout, dump results.

argv[1] is a JSON spec (see `run_layout` in test_parallel.py); rank r writes OUT/rank{r}.pt
with the per-step exit losses, the first step's full gradients of its stages, and its
stage boundaries.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from familial.parallel.checkpoint import save_checkpoint
from familial.parallel.mesh import ParallelDims, init_distributed
from familial.parallel.train import ParallelOptions, ParallelTrainer

sys.path.insert(0, os.path.dirname(__file__))
from family_fixtures import batches, make_family, optimizer_factory  # noqa: E402


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    init_distributed(timeout_s=120)
    rank = dist.get_rank()
    dims = ParallelDims(**spec["dims"]).resolve(dist.get_world_size())
    options = ParallelOptions(**spec.get("options", {}))
    family = make_family(spec["family"], seed=spec.get("seed", 0))
    trainer = ParallelTrainer(family, dims, options, optimizer=optimizer_factory(spec.get("lr", 1e-3)))
    dp_rank = trainer.mesh["dp_replicate", "dp_shard"]._flatten("dp").get_local_rank() if dims.dp > 1 else 0
    weights = {int(k): v for k, v in spec.get("weights", {}).items()} or {e: 1.0 for e in family.config.exits}
    result = {"losses": [], "boundaries": trainer.boundaries}
    for step, (input_ids, labels) in enumerate(batches(spec["family"], spec["steps"], seed=spec.get("seed", 0))):
        rows = input_ids.shape[0] // dims.dp
        local = slice(dp_rank * rows, (dp_rank + 1) * rows)
        losses = trainer.forward_backward(input_ids[local], labels[local], weights)
        if step == 0:
            result["grads"] = trainer.full_gradients()
        trainer.optimizer_step()
        result["losses"].append(losses)
        if spec.get("save_at") == step + 1:
            save_checkpoint(spec["checkpoint"], trainer, step + 1)
            result["saved_parameters"] = trainer.full_parameters()
    torch.save(result, os.path.join(spec["out"], f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
