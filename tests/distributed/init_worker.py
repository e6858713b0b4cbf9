"""Run by torchrun from test_sharded_init.py: build a layout from a weight source, measure this rank's
peak RSS while doing so, then compare the weights with a one-process build (rank 0).

argv[1] is a JSON spec: {"runs": [{"name", "init": InitConfig fields, "parallel": {...},
"measure": bool}], "seed", "out"}. Rank r writes OUT/rank{r}.json.
"""

import ctypes
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from familial.config import from_dict
from familial.parallel.layout import ParallelLayout
from familial.parallel.mesh import init_distributed
from familial.train.config import InitConfig, ParallelConfig, TrainConfig
from familial.train.init import weight_source
from familial.train.layout import LocalLayout


def status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    # Return what earlier runs freed to the system, so this run cannot reuse it unseen; then
    # writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def run(spec: dict, seed: int, run_dir: Path) -> dict:
    init = from_dict(InitConfig, spec["init"], "init")
    train = TrainConfig(init=init, run_dir=str(run_dir), parallel=ParallelConfig(**spec["parallel"]),
                        device="cpu", seed=seed)
    dist.barrier()
    reset_peak()
    before = status("VmRSS")
    source = weight_source(init, seed)
    layout = ParallelLayout(train, source.config)
    layout.load_weights(source)
    growth = status("VmHWM") - before
    dtypes = sorted({str(p.dtype) for _, p in layout.named_parameters()})
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for _, p in layout.named_parameters())
    held = layout.full_parameters()
    result = {"growth": growth, "local_bytes": 4 * local, "dtypes": dtypes}
    # Every parameter this rank holds (all of them without a pipeline) against one process.
    if dist.get_rank() == 0 or train.parallel.pp > 1:
        single = LocalLayout(train, source.config)
        single.load_weights(weight_source(init, seed))
        expected = dict(single.model.named_parameters())
        result["family_bytes"] = 4 * sum(p.numel() for p in expected.values())
        result["held"] = sorted(held)
        result["bitwise_equal"] = set(held) <= set(expected) and all(
            torch.equal(value, expected[name].detach()) for name, value in held.items())
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    init_distributed(timeout_s=120)
    out = Path(spec["out"])
    results = {run_spec["name"]: run(run_spec, spec.get("seed", 0), out / "run") for run_spec in spec["runs"]}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
