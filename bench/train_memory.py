"""Peak memory per rank of parallel layouts, measured on CPU, against `familial.parallel.memory`.

Runs 4 gloo processes under torchrun. For each layout every rank builds the real
`ParallelLayout` (FSDP, pipeline stages, tensor parallel), takes one step to create the
optimizer state, then measures a second step (forward/backward of every micro-batch,
clipping, the AdamW update): its peak = the bytes the rank holds at the step's start (local
parameters and AdamW moments) + the peak of what the CPU allocator hands out during the step
(torch.profiler's memory events; the least of three measured steps, two with --quick). The estimate is `familial.parallel.memory.rank_peak` for
the same family, layout, micro-batch and compute dtype (float32 on CPU).

    python bench/train_memory.py [--quick]

FSDP's reduce-scatter runs as an in-place all-reduce here (`reduce_scatter_in_place`: gloo's
own clones its input and frees the clone late, which also made a layout measured after
another read high).

Prints one row per layout and rank group, and as its last line one JSON object: per layout,
the largest measured peak over its ranks, the estimate for that rank's stage, their ratio,
and the grad_accum 2 / grad_accum 1 ratios the issue's "done when" names.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FAMILY = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, exits=[1, 3],
              max_position_embeddings=128)
ROWS, SEQ = 4, 64  # per micro-batch per data-parallel rank
QUICK = [("dp_shard 4", {"dp_shard": 4}, 1), ("dp_shard 4", {"dp_shard": 4}, 2),
         ("pp 2 x dp_shard 2", {"pp": 2, "dp_shard": 2, "microbatches": 2}, 1),
         ("pp 2 x dp_shard 2", {"pp": 2, "dp_shard": 2, "microbatches": 2}, 2)]
FULL = QUICK + [("dp_replicate 2 x dp_shard 2", {"dp_replicate": 2, "dp_shard": 2}, 2),
                ("tp 2 x dp_shard 2", {"tp": 2, "dp_shard": 2}, 2),
                ("pp 2 x dp_shard 2, pp_reshard", {"pp": 2, "dp_shard": 2, "microbatches": 2,
                                                   "pp_reshard": True}, 2)]


def held_bytes(layout) -> int:
    """Local parameters and AdamW moments this rank holds between steps."""
    from torch.distributed.tensor import DTensor

    def size(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    total = 0
    for optimizer in layout.optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                total += size(p) + sum(size(v) for v in optimizer.state[p].values() if v.dim())
    return total


def step_peak(step, trace: Path, repeats: int = 3) -> tuple[int, str]:
    """Peak bytes the CPU allocator holds during a step over what it held before it (the least
    of `repeats` steps after a first one), and the innermost op running at that peak.

    The profiler tracks only blocks allocated while it runs, so it runs from the first step:
    everything a measured step frees was allocated under it and is counted out. The least of
    a few steps, because gloo frees some communication buffers from its own threads, a few
    MB sooner or later from one step to the next.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        for index in range(repeats):
            gc.collect()
            with record_function(f"measured_step_{index}"):
                step()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    trace.unlink()
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    spans = [e for e in events if e.get("ph") == "X" and e.get("name", "").startswith("measured_step_")]
    best = None
    for span in spans:
        before = [e for e in memory if e["ts"] < span["ts"]]
        inside = [e for e in memory if span["ts"] <= e["ts"] <= span["ts"] + span["dur"]]
        start = before[-1]["args"]["Total Allocated"] if before else 0
        top = max(inside, key=lambda e: e["args"]["Total Allocated"])
        growth = top["args"]["Total Allocated"] - start
        if best is None or growth < best[0]:
            best = (growth, top)
    growth, top = best
    ops = sorted((e for e in events if e.get("ph") == "X" and e["ts"] <= top["ts"] <= e["ts"] + e.get("dur", 0)),
                 key=lambda e: e["ts"])
    return growth, " > ".join(e["name"] for e in ops[-4:])


def reduce_scatter_in_place(parts) -> None:
    """FSDP's gradient reduce-scatter as an in-place all-reduce and a copy of this rank's chunk.

    gloo's reduce-scatter clones its input and frees the clone when its worker thread gets to
    it, so on CPU one or more root-sized clones linger for a timing-dependent while; NCCL
    keeps no such copy. Measuring with this stand-in keeps the peak deterministic and what it
    is on GPUs (the same sums, the same buffers FSDP itself allocates)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

    class InPlace(ReduceScatter):
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            dist.all_reduce(input_tensor, op=op, group=group)
            output_tensor.copy_(input_tensor.view(group.size(), -1)[group.rank()])

    for part in parts:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.set_custom_reduce_scatter(InPlace())


def measure(name: str, parallel: dict, accumulation: int, out: Path, repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from familial.config import FamilyConfig
    from familial.model import FamilyModel
    from familial.parallel.layout import ParallelLayout
    from familial.train.config import InitConfig, ParallelConfig, TrainConfig
    from familial.train.init import ModelWeights

    config = FamilyConfig(**FAMILY)
    train = TrainConfig(init=InitConfig(model=config), run_dir=str(out / "run"), parallel=ParallelConfig(**parallel),
                        device="cpu", precision="fp32")
    layout = ParallelLayout(train, config)
    torch.manual_seed(0)
    layout.load_weights(ModelWeights(FamilyModel(config)))
    reduce_scatter_in_place(layout.parts)
    lambdas = {e: 1.0 for e in config.exits}
    generator = torch.Generator().manual_seed(layout.dp_rank)

    def step():
        micro = []
        for _ in range(accumulation):
            tokens = torch.randint(0, config.vocab_size, (ROWS, SEQ + 1), generator=generator)
            micro.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]})
        layout.forward_backward(micro, lambdas, {}, 1024)
        layout.clip_grad_norm(1.0)
        layout.optimizer_step()
        layout.zero_grad()

    growth, where = step_peak(step, out / f"trace{dist.get_rank()}.json", repeats)
    held = held_bytes(layout)
    peak = held + growth
    stage = layout.mesh["pp"].get_local_rank()
    layout.checkpointer.wait()
    return {"layout": name, "grad_accum": accumulation, "rank": dist.get_rank(), "stage": stage,
            "held": held, "peak": peak, "where": where}


def worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    from familial.parallel.mesh import init_distributed

    torch.set_num_threads(1)
    init_distributed(timeout_s=300)
    out = Path(spec["out"])
    results = [measure(name, parallel, accumulation, out, spec["repeats"])
               for name, parallel, accumulation in spec["layouts"]]
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def estimate(parallel: dict, accumulation: int, stage: int) -> dict:
    from familial.config import FamilyConfig
    from familial.parallel.memory import rank_peak
    from familial.train.config import ParallelConfig

    return rank_peak(FamilyConfig(**FAMILY), ParallelConfig(**parallel).resolve(4), ROWS * SEQ, "none", accumulation, compute_bytes=4,
                     device="cpu")[stage]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the four layouts of the issue's done-when only")
    parser.add_argument("--explain", action="store_true", help="name the op running at each peak")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    layouts = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"out": tmp, "layouts": layouts, "repeats": 2 if args.quick else 3}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                   str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            sys.exit(f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(4)]
    figures = {}
    print("layout | grad_accum | stage | measured peak MB (max over ranks) | estimate MB | estimate / measured")
    for index, (name, parallel, accumulation) in enumerate(layouts):
        rows = [rank[index] for rank in ranks]
        for stage in sorted({r["stage"] for r in rows}):
            peak = max(r["peak"] for r in rows if r["stage"] == stage)
            want = estimate(parallel, accumulation, stage)["total"]
            key = f"{name}, grad_accum {accumulation}, stage {stage}"
            figures[key] = {"measured_mb": round(peak / 1e6, 2), "estimate_mb": round(want / 1e6, 2),
                            "ratio": round(want / peak, 3)}
            print(f"{name} | {accumulation} | {stage} | {peak / 1e6:.2f} | {want / 1e6:.2f} | {want / peak:.3f}")
            if args.explain:
                top = max((r for r in rows if r["stage"] == stage), key=lambda r: r["peak"])
                print(f"    rank {top['rank']}: held {top['held'] / 1e6:.2f} MB, peak in: {top['where']}")
    for name in dict.fromkeys(n for n, _, _ in layouts):
        for stage in range(2):
            one, two = (figures.get(f"{name}, grad_accum {a}, stage {stage}") for a in (1, 2))
            if one and two:
                figures[f"{name}, stage {stage}: grad_accum 2 / 1"] = round(two["measured_mb"] / one["measured_mb"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
