"""Training throughput and MFU of the layout a team runs (FSDP over N GPUs), on a slice of the family.

Runs itself under torchrun with `--nproc` processes (default: every visible GPU, else one)
and times the trainer's own step through `ParallelLayout`: FSDP2 over the processes (bf16
compute over float32 master weights on CUDA; one process holds whole weights and computes
under autocast), the chunked exit losses, AdamW, clipping. Measured in the same run:
  * the joint step: one trunk pass feeding every exit;
  * the previous-trainer baseline the paper compares against: one forward/backward per
    member (each re-runs the shared trunk), same tokens and optimizer;
  * the device's measured dense matmul peak (bf16 on CUDA, fp32 on CPU), printed beside the
    MFU against the device's data-sheet bf16 peak (`SPEC_BF16_PEAK`, by exact device name).
Families: a slice of the 14B family (Qwen3-14B widths: hidden 5120, 40/8 heads, head dim
128; 4 trunk layers with exits 1 and 3) at sequence 4096 whose heads take the family's share
of the step's weight FLOPs (the full family: 3 heads of 151936 x 5120 among 42 blocks, 14.4%;
a 4-layer slice with its real vocabulary would give its heads 48.5%, so the slice's vocabulary
is scaled to match: `slice_vocab`), and a ~1.3B family (Qwen3-1.7B widths, 18 layers, exits
4/10/17). `--quick` runs a tiny family on whatever device there is (CPU included, where the
test suite runs it, one gloo process), through exactly the same code.

    python bench/gpu_train.py                  # both families, one process per visible GPU
    python bench/gpu_train.py --nproc 8        # FSDP over 8 GPUs
    python bench/gpu_train.py --quick          # tiny family, < 1 minute, any device
Last line: one JSON object with every figure (rank 0's timings; every rank runs in lock step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from familial.checkpoint_io import family_parameter_names
from familial.config import FamilyConfig
from familial.train.config import InitConfig, LRConfig, ParallelConfig, TrainConfig
from familial.train.init import RandomInit

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s, by the
# exact name torch.cuda.get_device_name reports: an unlisted device gets no spec MFU rather
# than a neighbour's peak.
SPEC_BF16_PEAK = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12, "NVIDIA A10": 125e12,
}
FAMILY_14B = dict(vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=8, head_dim=128, exits=[2, 21, 39])


def block_flops(config: FamilyConfig) -> float:
    """Weight FLOPs per token (x 1/2) of every decoder block a joint step runs: trunk and branches."""
    hidden, head_dim = config.hidden_size, config.head_dim
    layer = hidden * head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads) + \
        3 * hidden * config.intermediate_size
    return layer * (config.num_hidden_layers + sum(config.branch_depth(e) for e in config.exits[:-1]))


def head_share(config: FamilyConfig) -> float:
    """The heads' share of a joint step's weight FLOPs (every block and head runs once per token)."""
    heads = len(config.exits) * config.hidden_size * config.vocab_size
    return heads / (block_flops(config) + heads)


def slice_vocab(family: FamilyConfig, layers: int, exits: list[int], multiple: int = 128) -> int:
    """The vocabulary that gives a `layers`-layer slice with `exits` the family's head share."""
    probe = FamilyConfig(**{**family.to_dict(), "num_hidden_layers": layers, "exits": exits})
    share = head_share(family)
    vocab = share / (1 - share) * block_flops(probe) / (len(exits) * probe.hidden_size)
    return max(multiple, round(vocab / multiple) * multiple)


def families(quick: bool) -> dict[str, tuple[FamilyConfig, int, int]]:
    """name -> (config, sequences per step per process, sequence length)."""
    if quick:
        return {"tiny": (FamilyConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, exits=[1, 3]), 2, 128)}
    family = FamilyConfig(**FAMILY_14B)
    return {
        "14b_slice": (FamilyConfig(**{**FAMILY_14B, "num_hidden_layers": 4, "exits": [1, 3],
                                      "vocab_size": slice_vocab(family, 4, [1, 3]),
                                      "max_position_embeddings": 8192}), 1, 4096),
        "1b_family": (FamilyConfig(vocab_size=32768, hidden_size=2048, intermediate_size=6144, num_hidden_layers=18,
                                   num_attention_heads=16, num_key_value_heads=8, head_dim=128, exits=[4, 10, 17],
                                   max_position_embeddings=4096), 4, 2048),
    }


def spec_peak(device: torch.device) -> float | None:
    return SPEC_BF16_PEAK.get(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best measured dense matmul throughput in `dtype`, FLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        synchronize(device)
        best = max(best, 5 * 2 * size ** 3 / (time.perf_counter() - start))
    return best


def step_flops(config: FamilyConfig, tokens: int, length: int) -> float:
    """Model FLOPs of one joint step: 6 per matmul weight per token for every layer and head the
    step runs (the trunk once, each branch, each exit's head), plus attention scores and values
    without the causal discount (12 * layers * heads * head_dim * T per token)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
    layer = attention + 3 * hidden * config.intermediate_size
    layers_run = config.num_hidden_layers + sum(config.branch_depth(e) for e in config.exits[:-1])
    matmul = layers_run * layer + len(config.exits) * hidden * config.vocab_size
    scores = 12 * layers_run * config.num_attention_heads * head_dim * length
    return tokens * (6 * matmul + scores)


def timed(step, device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(name: str, config: FamilyConfig, rows: int, length: int, args, peaks: dict) -> dict:
    import torch.distributed as dist

    from familial.parallel.layout import ParallelLayout

    train = TrainConfig(init=InitConfig(model=config), device=args.device, precision=args.precision,
                        activation_checkpointing=args.checkpointing, compile=args.compile, lr=LRConfig(lr=1e-5),
                        parallel=ParallelConfig(), run_dir=args.run_dir)
    layout = ParallelLayout(train, config)
    layout.load_weights(RandomInit(config, 0))
    device = layout.device
    generator = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, config.vocab_size, (rows, length + 1), generator=generator)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].contiguous()}
    everyone = {e: 1.0 for e in config.exits}

    def update() -> None:
        layout.clip_grad_norm(1.0)
        layout.optimizer_step()
        layout.zero_grad()

    def joint() -> None:
        layout.forward_backward([batch], everyone, {}, args.chunk)
        update()

    def per_member() -> None:
        for e in config.exits:  # each pass runs the trunk up to its own exit
            layout.forward_backward([batch], {e: 1.0}, {}, args.chunk)
        update()

    steps, warmup = (2, 1) if args.quick else (args.steps, 2)
    joint_s = timed(joint, device, steps, warmup)
    member_s = timed(per_member, device, steps, warmup)
    world = dist.get_world_size()
    flops = step_flops(config, rows * length, length) / joint_s  # per process
    result = {"parameters": sum(math.prod(shape) for shape in family_parameter_names(config).values()), "processes": world,
              "batch_per_process": rows, "seq": length, "head_share_of_weight_flops": round(head_share(config), 3),
              "tokens_per_s": round(world * rows * length / joint_s),
              "mfu_vs_measured_peak": round(flops / peaks["measured"], 4),
              "mfu_vs_spec_bf16_peak": round(flops / peaks["spec"], 4) if peaks["spec"] else None,
              "speedup_one_pass_vs_per_member": round(member_s / joint_s, 2)}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 1)
        torch.cuda.reset_peak_memory_stats(device)
    layout.checkpointer.wait()
    if dist.get_rank():
        return result
    print(f"{name} ({result['parameters'] / 1e9:.2f}B params, exits {config.exits}, {world} x {rows}x{length}): "
          f"{result['tokens_per_s']} tokens/s, MFU {result['mfu_vs_measured_peak']:.1%} of the measured peak"
          + (f", {result['mfu_vs_spec_bf16_peak']:.1%} of the spec bf16 peak" if peaks["spec"] else "")
          + f"; one trunk pass vs one pass per member: {result['speedup_one_pass_vs_per_member']}x", flush=True)
    return result


def launch(args, argv: list[str]) -> int:
    """Run this script under torchrun with `--nproc` processes; their output is this run's."""
    nproc = args.nproc or max(torch.cuda.device_count(), 1)
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   str(Path(__file__).resolve()), *argv, "--run-dir", run_dir]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or 1))
        return subprocess.run(command, env=env, check=False).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny family on any device (< 1 minute)")
    parser.add_argument("--nproc", type=int, help="processes (FSDP ranks); default: every visible GPU, else 1")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--checkpointing", default="selective", choices=["none", "full", "selective"])
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per exit-loss chunk")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--threads", type=int, help="CPU threads per process (CPU runs)")
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:
        sys.exit(launch(args, sys.argv[1:]))
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch.distributed as dist

    from familial.parallel.mesh import init_distributed
    from familial.train.layout import compute_dtype, resolve_device

    init_distributed()
    device = resolve_device(args.device)
    dtype = compute_dtype(args.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    size = 512 if args.quick else 8192
    peaks = {"measured": matmul_peak(device, dtype, size, 3 if args.quick else 10), "spec": spec_peak(device)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    main_rank = dist.get_rank() == 0
    if main_rank:
        print(f"{name}: measured {str(dtype)[6:]} matmul peak {peaks['measured'] / 1e12:.2f} TFLOP/s; spec bf16 "
              "peak " + (f"{peaks['spec'] / 1e12:.0f} TFLOP/s" if peaks["spec"] else "unknown (not in SPEC_BF16_PEAK)"),
              flush=True)
    results = {name_: measure(name_, config, rows, length, args, peaks)
               for name_, (config, rows, length) in families(args.quick).items()}
    world = dist.get_world_size()
    dist.barrier()
    dist.destroy_process_group()
    if main_rank:
        print(json.dumps({"bench": "gpu_train", "device": name, "processes": world, "quick": args.quick,
                          "dtype": str(dtype)[6:], "checkpointing": args.checkpointing, "compile": args.compile,
                          "measured_peak_tflops": round(peaks["measured"] / 1e12, 3),
                          "spec_bf16_peak_tflops": peaks["spec"] and round(peaks["spec"] / 1e12),
                          "families": results}))


if __name__ == "__main__":
    main()
