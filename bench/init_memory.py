"""Peak memory of meta-device initialisation per rank, against the whole family's size.

Launches itself under torchrun (4 CPU processes, gloo, tensor parallel 2 x FSDP 2) and, on
every rank, builds the layout from a family checkpoint and from a random seed, measuring
the rank's peak resident memory added while doing so (VmHWM reset before each build).
Before meta-device init every rank built the whole family first, so this figure was at
least the family's size; now it is about a rank's quarter share plus a fixed margin.

    python bench/init_memory.py            # ~530 MB family (float32)
    python bench/init_memory.py --quick    # ~190 MB family
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PROCESSES = 4


def family_fields(quick: bool) -> dict:
    hidden = 512 if quick else 1024
    return {"vocab_size": 16384, "hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": 6,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 128, "head_dim": 64,
            "exits": [1, 5]}


def status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(spec: dict) -> None:
    import torch.distributed as dist

    from familial.config import FamilyConfig
    from familial.parallel.layout import ParallelLayout
    from familial.parallel.mesh import init_distributed
    from familial.train.config import InitConfig, ParallelConfig, TrainConfig
    from familial.train.init import weight_source

    torch.set_num_threads(1)
    init_distributed()
    out = {}
    for name, init in (("family_checkpoint", InitConfig(family=spec["family"])),
                       ("random", InitConfig(model=FamilyConfig(**spec["model"])))):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident size
        before = status("VmRSS")
        source = weight_source(init, 0)
        train = TrainConfig(init=init, parallel=ParallelConfig(tp=2, dp_shard=2), device="cpu",
                            run_dir=spec["run_dir"])
        layout = ParallelLayout(train, source.config)
        layout.load_weights(source)
        share = sum(4 * p.to_local().numel() for _, p in layout.named_parameters())
        out[name] = {"peak_growth": status("VmHWM") - before, "share": share}
        del layout, source
    Path(spec["out"], f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller family")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    from familial.checkpoint_io import save_family
    from familial.config import FamilyConfig
    from familial.model import FamilyModel

    fields = family_fields(args.quick)
    with tempfile.TemporaryDirectory() as temp:
        torch.manual_seed(0)
        model = FamilyModel(FamilyConfig(**fields))
        family_bytes = 4 * sum(p.numel() for p in model.parameters())
        save_family(model, Path(temp) / "family")
        del model
        spec = {"family": str(Path(temp) / "family"), "model": fields, "out": temp, "run_dir": str(Path(temp) / "run")}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={PROCESSES}", __file__, "--worker", json.dumps(spec)],
                       check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        ranks = [json.loads((Path(temp) / f"rank{r}.json").read_text()) for r in range(PROCESSES)]
    figures = {}
    for name in ("family_checkpoint", "random"):
        peak = max(r[name]["peak_growth"] for r in ranks)
        share = max(r[name]["share"] for r in ranks)
        figures[name] = {"peak_growth_mib": round(peak / 2**20, 1), "share_mib": round(share / 2**20, 1),
                         "peak_vs_family": round(peak / family_bytes, 3)}
        print(f"init from {name}: peak growth per rank {peak / 2**20:.0f} MiB = {peak / family_bytes:.2f} x the "
              f"family ({family_bytes / 2**20:.0f} MiB float32); the rank's share is {share / 2**20:.0f} MiB")
    print(json.dumps({"bench": "init_memory", "quick": args.quick, "processes": PROCESSES, "layout": "tp2 x dp_shard2",
                      "family_mib": round(family_bytes / 2**20, 1), "init": figures}))


if __name__ == "__main__":
    main()
