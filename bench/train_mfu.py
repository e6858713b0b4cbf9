"""CPU model FLOPs utilisation of the joint multi-exit training step, in one run.

For each width, measured in the same process with the same thread count:
  * the fp32 matmul peak: the best of several large square matmuls, the MFU denominator;
  * our joint step (`familial.train.layout.LocalLayout`, the trainer's own step: one trunk
    pass, every exit's chunked loss, AdamW), eager and with each block compiled;
  * stock transformers training of the full member alone (Qwen3ForCausalLM, its own
    loss, the same AdamW), the baseline any trainer is measured against.
MFU = model FLOPs of the step (6 per matmul weight per token plus attention, as
bench/gpu_train.py counts them) / step time / measured peak. Contenders alternate round by
round and keep their best round, so a shared machine's noise penalises none of them.
Goal: >= 60% at hidden 1024 and never below transformers at any width.

    python bench/train_mfu.py --threads 2          # widths 256, 512, 1024
    python bench/train_mfu.py --quick               # widths 256 and 1024, fewer rounds
Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json

import torch

from train import best_times

from familial.config import FamilyConfig
from familial.train.config import InitConfig, LRConfig, OptimConfig, TrainConfig
from familial.train.init import RandomInit
from familial.train.layout import LocalLayout


def family(width: int, vocab: int, layers: int) -> FamilyConfig:
    heads = width // 64
    return FamilyConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), head_dim=64,
                        exits=[1, layers - 1], max_position_embeddings=4096, rope_theta=10000.0)


def step_flops(config: FamilyConfig, tokens: int, length: int, members: list[int]) -> float:
    """Training FLOPs of the layers and heads the step runs (members' exits; shared layers once)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
    layer = attention + 3 * hidden * config.intermediate_size
    deepest = max(members)
    layers_run = (config.num_hidden_layers if deepest == config.exits[-1] else deepest) + sum(
        config.branch_depth(e) for e in members if e != config.exits[-1])
    matmul = layers_run * layer + len(members) * hidden * config.vocab_size
    scores = 12 * layers_run * config.num_attention_heads * head_dim * length
    return tokens * (6 * matmul + scores)


PEAK_SIZE = 2048


def matmul(size: int = PEAK_SIZE):
    """A square fp32 matmul: timed beside the steps, its best round is the measured peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return lambda: a @ b


def ours(config: FamilyConfig, batch: dict, compile: bool):
    train = TrainConfig(init=InitConfig(model=config), device="cpu", compile=compile, optim=OptimConfig(),
                        lr=LRConfig(lr=1e-4))
    layout = LocalLayout(train, config)
    layout.load_weights(RandomInit(config, 0))
    lambdas = {e: 1.0 for e in config.exits}

    def step() -> None:
        layout.forward_backward([batch], lambdas, {}, 1024)
        layout.clip_grad_norm(1.0)
        layout.optimizer_step()
        layout.zero_grad()
    return step


def transformers_step(config: FamilyConfig, batch: dict):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = Qwen3Config(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                     num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                     head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                     rope_theta=config.rope_theta, tie_word_embeddings=False)
    hf._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(hf)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="widths 256 and 1024, fewer rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--widths", type=int, nargs="*", help="hidden sizes (default 256 512 1024)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    widths = args.widths or ([256, 1024] if args.quick else [256, 512, 1024])
    rounds = 2 if args.quick else 4
    vocab, layers, rows, length = 8192, 4, 4, 256
    print(f"{args.threads} thread(s); {layers} layers, exits [1, {layers - 1}], vocab {vocab}, "
          f"batch {rows}x{length}")
    measured, peak = {}, 0.0
    for width in widths:
        config = family(width, vocab, layers)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (rows, length + 1), generator=generator)
        batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        contenders = {"joint": ours(config, batch, compile=False),
                      "transformers_full_member": transformers_step(config, batch), "matmul": matmul()}
        if not args.no_compile:
            contenders["joint_compiled"] = ours(config, batch, compile=True)
        times = best_times(contenders, rounds, steps=1, warmup=1)
        # The peak: the best square matmul of any round of any width.
        peak = max(peak, 2 * PEAK_SIZE ** 3 / times.pop("matmul"))
        flops = {name: step_flops(config, rows * length, length,
                                  [config.exits[-1]] if name.startswith("transformers") else config.exits)
                 for name in times}
        measured[width] = (times, flops)
    print(f"fp32 matmul peak measured: {peak / 1e9:.1f} GFLOP/s (the best {PEAK_SIZE}^3 matmul of the run)")
    figures = {}
    for width, (times, flops) in measured.items():
        mfu = {name: flops[name] / seconds / peak for name, seconds in times.items()}
        figures[width] = {"mfu": {k: round(v, 4) for k, v in mfu.items()},
                          "step_s": {k: round(v, 3) for k, v in times.items()}}
        best_ours = max(v for k, v in mfu.items() if k.startswith("joint"))
        print(f"hidden {width}: MFU joint {mfu['joint']:.1%}"
              + (f", compiled {mfu['joint_compiled']:.1%}" if "joint_compiled" in mfu else "")
              + f"; transformers full member {mfu['transformers_full_member']:.1%}; ours / transformers "
              f"{best_ours / mfu['transformers_full_member']:.2f}x")
    top = max(widths)
    best_at_top = max(v for k, v in figures[top]["mfu"].items() if k.startswith("joint"))
    print(json.dumps({"bench": "train_mfu", "threads": args.threads, "quick": args.quick,
                      "matmul_peak_gflops": round(peak / 1e9, 1), "widths": figures,
                      "goal_mfu_at_1024": 0.6, f"best_joint_mfu_at_{top}": round(best_at_top, 4),
                      "never_below_transformers": all(
                          max(v for k, v in f["mfu"].items() if k.startswith("joint"))
                          >= f["mfu"]["transformers_full_member"] for f in figures.values())}))


if __name__ == "__main__":
    main()
