"""Run by torchrun from the distributed tests: train a tiny family under one layout, dump results.

argv[1] is a JSON spec (see `run_layout` in test_parallel.py); rank r writes OUT/rank{r}.pt
with the per-step exit losses, the first step's full gradients of its parts, its stage
boundaries, and what the spec asks to measure. The step is `ParallelLayout.forward_backward`,
the one the trainer's loop runs.
"""

import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from familial.config import FamilyConfig
from familial.parallel.layout import ParallelLayout
from familial.parallel.mesh import init_distributed
from familial.train.config import InitConfig, ParallelConfig, TrainConfig
from familial.train.init import ModelWeights

sys.path.insert(0, os.path.dirname(__file__))
from family_fixtures import OpCounter, batches, make_family, optimizer_factory, saved_bytes


def build(spec: dict) -> ParallelLayout:
    family = make_family(spec["family"], seed=spec.get("seed", 0))
    train = TrainConfig(init=InitConfig(model=family.config), run_dir=spec.get("run_dir", "unused"),
                        parallel=ParallelConfig(**spec["parallel"]), device="cpu", **spec.get("train", {}))
    layout = ParallelLayout(train, FamilyConfig.from_dict(family.config.to_dict()))
    layout.load_weights(ModelWeights(family))
    # The single-process reference's optimizer: the same per-parameter arithmetic on shards.
    layout.optimizers = [optimizer_factory(spec.get("lr", 1e-3))(part) for part in layout.parts]
    return layout


def state_bytes(layout: ParallelLayout) -> int:
    """Bytes this rank holds for its parameters, their gradients and their AdamW state."""
    def local(tensor):
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    total = 0
    for optimizer in layout.optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                tensors = [p, p.grad, *(v for v in optimizer.state[p].values() if v.dim())]
                total += sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)
    return total


def host_side(op: str, args, labels: torch.Tensor, hidden: int) -> bool:
    """Reads the trainer makes of tensors that stay on the host (target counts of the labels,
    the loss's target rows of a micro-batch's labels), and torch's own vocabulary-parallel
    embedding, which zeroes the rows of ids another rank holds with a boolean mask."""
    tensor = args[0]
    if op == "aten.index_put_.default":
        return tensor.dim() == 3 and tensor.shape[-1] == hidden and tensor.shape[:2] == args[1][0].shape
    if op == "aten._local_scalar_dense.default":
        return tensor.dtype == torch.int64 and tensor.dim() == 0
    return op == "aten.nonzero.default" and tensor.dtype == torch.bool and tensor.dim() == 1 \
        and labels.numel() % tensor.numel() == 0


def count_clip(layout: ParallelLayout) -> dict:
    """The norm, and the collectives and host reads of computing it and of clipping to a quarter."""
    counter = OpCounter()
    with counter:
        norm = layout.clip_grad_norm(0.0)
    clip = OpCounter()
    with clip:
        layout.clip_grad_norm(norm / 4)
    return {"norm": norm, "collectives": counter.collectives, "host_reads": counter.host_reads,
            "clip_collectives": clip.collectives, "clip_host_reads": clip.host_reads,
            "clipped_norm": layout.clip_grad_norm(0.0)}


def run(spec: dict) -> dict:
    layout = build(spec)
    exits = layout.config.exits
    weights = {int(k): v for k, v in spec.get("weights", {}).items()} or {e: 1.0 for e in exits}
    distill = {int(k): v for k, v in spec.get("distill", {}).items()}
    accumulation = spec.get("grad_accum", 1)
    result = {"losses": [], "boundaries": layout.boundaries, "peak_saved_bytes": []}
    for step, (input_ids, labels) in enumerate(batches(spec["family"], spec["steps"], seed=spec.get("seed", 0),
                                                       batch=spec.get("batch", 4))):
        rows = input_ids.shape[0] // layout.dp_size
        local = slice(layout.dp_rank * rows, (layout.dp_rank + 1) * rows)
        ids, targets = input_ids[local], labels[local]
        size = rows // accumulation
        micro = [{"input_ids": ids[i * size:(i + 1) * size], "labels": targets[i * size:(i + 1) * size]}
                 for i in range(accumulation)]
        counter = OpCounter(functools.partial(host_side, labels=targets, hidden=layout.config.hidden_size))
        with saved_bytes() as peak, counter if spec.get("count") and step == 0 else contextlib.nullcontext():
            sums = layout.forward_backward(micro, weights, distill, spec.get("chunk_size", 1024))
        result["peak_saved_bytes"].append(peak())
        if step == 0:
            result["step_host_reads"] = counter.host_reads
            result["grads"] = layout.full_gradients()
        if spec.get("count") and step == 0:
            result["clip"] = count_clip(layout)
        layout.optimizer_step()
        if step == 0:
            result["state_bytes"] = state_bytes(layout)
        layout.zero_grad()
        result["losses"].append({e: v / sums.targets for e, v in sums.per_exit.ce.items()})
        if distill:
            result.setdefault("kd", []).append({e: v / sums.targets for e, v in sums.per_exit.kd.items()})
        if spec.get("save_at") == step + 1:
            result["checkpoint"] = str(layout.save(step + 1, {"step": step + 1}))
            result["saved_parameters"] = layout.full_parameters()
    layout.checkpointer.wait()
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    init_distributed(timeout_s=120)
    if spec.get("node_local_run_dir"):
        # Each rank its own working directory: a relative run_dir is then on another "node".
        local = Path(spec["out"]) / f"node{dist.get_rank()}"
        local.mkdir()
        os.chdir(local)
        spec["run_dir"] = "run"
    # Several runs in one launch share the process group (each builds its own mesh).
    results = [run({**spec, **variant}) for variant in spec.get("variants", [{}])]
    torch.save(results if "variants" in spec else results[0], Path(spec["out"]) / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
