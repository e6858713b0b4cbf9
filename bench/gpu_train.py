"""Training throughput and model FLOPs utilisation (MFU) of a ~1.3B-parameter family on one GPU.

Measured in the same run:
  * the GPU's bf16 matmul peak (a large square matmul, best of several), the MFU baseline;
  * the family step: one trunk pass feeding every exit, losses injected per exit
    (`familial.parallel.stage.FamilyStage`, the path every parallel layout runs), bf16
    autocast over float32 master weights, fused AdamW;
  * the previous-trainer baseline the paper compares against: one forward/backward per
    member (each member re-runs the shared trunk), same tokens and optimizer.
Prints the ratios and, as the LAST line, one JSON object. Without CUDA it prints a JSON line
saying so and exits 0.

    python bench/gpu_train.py            # ~1.3B family, seq 2048
    python bench/gpu_train.py --quick    # smaller family and fewer steps (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def family_config(quick: bool):
    from familial.config import FamilyConfig

    if quick:
        return FamilyConfig(vocab_size=32768, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=128, exits=[2, 5, 7])
    # Qwen3-1.7B widths, 18 layers, a 32k vocabulary: ~1.27B parameters with two branches.
    return FamilyConfig(vocab_size=32768, hidden_size=2048, intermediate_size=6144, num_hidden_layers=18,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, exits=[4, 10, 17])


def matmul_peak(size: int, repeats: int) -> float:
    """Best measured bf16 dense matmul throughput, FLOP/s."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * size ** 3 / (time.perf_counter() - start))
    return best


def step_flops(config, tokens: int, length: int) -> float:
    """Model FLOPs of one training step (6 per matmul weight per token, plus attention scores).

    Counts every layer and head the step runs: the trunk once, each branch, each exit's head.
    Attention is counted without the causal discount (12 * layers * heads * head_dim * T).
    """
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
    layer = attention + 3 * hidden * config.intermediate_size
    layers_run = config.num_hidden_layers + sum(config.branch_depth(e) for e in config.exits[:-1])
    matmul = layers_run * layer + len(config.exits) * hidden * config.vocab_size
    scores = 12 * layers_run * config.num_attention_heads * head_dim * length
    return tokens * (6 * matmul + scores)


def timed_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller family and fewer steps")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu_train", "gpu": None, "skipped": "no CUDA device"}))
        return

    from familial.model import FamilyModel
    from familial.parallel.stage import FamilyStage
    from familial.train.losses import count_targets, exit_loss_sum

    torch.backends.cuda.matmul.allow_tf32 = True
    quick = args.quick
    batch = args.batch or (4 if quick else 8)
    length = args.seq or (1024 if quick else 2048)
    steps = args.steps or (3 if quick else 10)
    config = family_config(quick)
    peak = matmul_peak(4096 if quick else 8192, 5 if quick else 20)

    torch.manual_seed(0)
    model = FamilyModel(config).cuda()
    parameters = sum(p.numel() for p in model.parameters())
    stage = FamilyStage(model, 0, config.num_hidden_layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, config.vocab_size, (batch, length + 1), device="cuda")
    input_ids, labels = tokens[:, :-1], tokens[:, 1:].contiguous()
    targets = count_targets(labels)
    stage.global_targets = targets

    def family_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = stage(input_ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stage.take_records()

    members = [model.member(e) for e in config.exits]

    def member_step() -> None:
        for member in members:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                hidden = member.hidden_states(input_ids)
                loss = exit_loss_sum(hidden, member.lm_head, labels).ce_sum / targets
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup = 1 if quick else 3
    family_s = timed_steps(family_step, steps, warmup)
    member_s = timed_steps(member_step, steps, warmup)
    memory = torch.cuda.max_memory_allocated() / 2 ** 30
    step_tokens = batch * length
    flops = step_flops(config, step_tokens, length)
    result = {
        "bench": "gpu_train", "gpu": torch.cuda.get_device_name(), "quick": quick,
        "family_parameters": parameters, "batch": batch, "seq": length,
        "matmul_peak_tflops": round(peak / 1e12, 1),
        "family_tokens_per_s": round(step_tokens / family_s),
        "family_mfu": round(flops / family_s / peak, 4),
        "per_member_tokens_per_s": round(step_tokens / member_s),
        "speedup_one_pass_vs_per_member": round(member_s / family_s, 2),
        "peak_memory_gib": round(memory, 1),
    }
    print(f"{result['gpu']}: bf16 matmul peak {result['matmul_peak_tflops']} TFLOP/s")
    print(f"family ({parameters / 1e9:.2f}B params, exits {config.exits}): "
          f"{result['family_tokens_per_s']} tokens/s, MFU {result['family_mfu']:.1%} of measured peak")
    print(f"one trunk pass for all exits vs one pass per member: "
          f"{result['speedup_one_pass_vs_per_member']}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
