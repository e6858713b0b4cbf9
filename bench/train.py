"""Joint multi-exit training against its baselines, measured in one run on one machine.

(a) tokens/s of our joint step (one trunk pass, every exit's chunked loss) over training the
    members one forward pass per exit (K forward+backward passes per step, each exit with
    full logits: what a trainer without multi-exit support has to do). Target >= 2x. The
    FLOP ratio of the two is printed beside it: it bounds the speedup, and for exits spread
    evenly over the trunk it is (sum of member depths) / (trunk + branches), about 1.6x for
    this 8-layer, 4-exit demo family and 1.5x for the published 40-layer exits 2/21/39.
(b) tokens/s of plain single-model training of the full member with transformers'
    Qwen3ForCausalLM over ours: our overhead must stay within the branches' extra FLOPs
    (analytic count, 6 FLOPs per parameter-token plus attention) + 10%.
(c) peak memory of one training step (forward + backward) with 3 exits over 1 exit at
    vocab 151936. Each configuration runs in a fresh subprocess; memory is the process's
    peak RSS (getrusage ru_maxrss) minus its RSS just before the step, i.e. what the
    step adds on top of the weights: activations, logits, gradients. Target <= 1.25x.
    The same is measured for full-logit losses to show what chunking saves.

Timings alternate between the contenders round by round and keep each one's best round,
so a noisy shared machine penalises none of them. Last line: JSON of all figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from familial.config import FamilyConfig
from familial.model import FamilyModel
from familial.train.config import OptimConfig
from familial.train.config import InitConfig, TrainConfig
from familial.train.init import RandomInit
from familial.train.layout import LocalLayout
from familial.train.loop import train_step
from familial.train.params import build_optimizer

BIG_VOCAB = 151936


def family_config(vocab: int, hidden: int, layers: int, exits: list[int]) -> FamilyConfig:
    return FamilyConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        exits=exits, max_position_embeddings=4096, rope_theta=10000.0)


def train_flops_per_token(config: FamilyConfig, seq_len: int, layers: int, heads: int) -> float:
    """6 x matmul parameters + attention scores/values, for `layers` decoder layers and `heads` LM heads."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    attention = 2 * 2 * seq_len * q
    return 3 * (2 * (layers * layer + heads * h * config.vocab_size) + layers * attention)


def random_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator)
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def joint_layout(config: FamilyConfig) -> LocalLayout:
    """The trainer's one-process layout (its step is what `familial train` runs)."""
    layout = LocalLayout(TrainConfig(init=InitConfig(model=config), device="cpu"), config)
    layout.load_weights(RandomInit(config, 0))
    return layout


def joint_step(layout, batch, chunk):
    lambdas = {e: 1.0 for e in layout.config.exits}
    train_step(layout, [batch], lambdas, {}, chunk, grad_clip=1.0)


def per_exit_step(model, optimizer, batch):
    """One forward+backward per member, each with full logits, as a single-exit trainer does."""
    for e in model.config.exits:
        logits = model.member(e)(batch["input_ids"])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def hf_step(model, optimizer, batch):
    # Stock causal-LM training: transformers shifts the labels itself, so pass the inputs.
    model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def hf_model(config: FamilyConfig):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = Qwen3Config(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size,
                     num_hidden_layers=config.num_hidden_layers,
                     num_attention_heads=config.num_attention_heads,
                     num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
                     max_position_embeddings=config.max_position_embeddings,
                     rope_theta=config.rope_theta, tie_word_embeddings=False)
    hf._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(hf)


def best_times(contenders: dict[str, callable], rounds: int, steps: int, warmup: int) -> dict[str, float]:
    for step in contenders.values():
        for _ in range(warmup):
            step()
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def memory_child(exits: int, chunked: bool, hidden: int, batch: int, seq_len: int, chunk: int) -> None:
    """Runs in a subprocess: prints the peak RSS (bytes) one training step adds."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = family_config(BIG_VOCAB, hidden, 4, [1, 2, 3])
    model = FamilyModel(config)
    data = random_batch(BIG_VOCAB, batch, seq_len)
    used = config.exits[-exits:]
    before = _rss_bytes()
    if chunked:
        from familial.train.losses import count_targets, family_loss_sums, total_objective
        losses = family_loss_sums(model, data["input_ids"], data["labels"], {e: 1.0 for e in used},
                                  chunk_size=chunk)
        total_objective(losses, count_targets(data["labels"])).backward()
    else:
        logits = model(data["input_ids"], exits=used)
        sum(F.cross_entropy(logits[e].reshape(-1, BIG_VOCAB), data["labels"].reshape(-1))
            for e in used).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"step_bytes": peak - before}))


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_memory(exits: int, chunked: bool, args) -> int:
    command = [sys.executable, __file__, "--memory-child", str(exits), str(int(chunked)),
               str(args.mem_hidden), str(args.mem_batch), str(args.mem_seq), str(args.chunk)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["step_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and a smaller batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-child", nargs=6, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], bool(args.memory_child[1]), *args.memory_child[2:])
        return
    torch.set_num_threads(args.threads)
    vocab, hidden, layers, exits = 2048, 128, 8, [1, 3, 5, 7]
    batch_size, seq_len = (4, 128) if args.quick else (8, 256)
    rounds, steps = (2, 2) if args.quick else (3, 4)
    args.chunk = 256
    args.mem_hidden, args.mem_batch, args.mem_seq = 64, (2 if args.quick else 4), 256

    config = family_config(vocab, hidden, layers, exits)
    torch.manual_seed(0)
    joint = joint_layout(config)
    per_exit_model = FamilyModel(config)
    hf = hf_model(config)
    optim = OptimConfig()
    per_exit_opt = build_optimizer(per_exit_model, optim, 1e-4)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    batch = random_batch(vocab, batch_size, seq_len)
    tokens = batch["input_ids"].numel()
    print(f"model: {layers} layers, hidden {hidden}, vocab {vocab}, exits {exits}; batch {batch_size}x{seq_len}; "
          f"{args.threads} thread(s)")
    times = best_times({
        "joint": lambda: joint_step(joint, batch, args.chunk),
        "per_exit": lambda: per_exit_step(per_exit_model, per_exit_opt, batch),
        "hf_full_member": lambda: hf_step(hf, hf_opt, batch),
    }, rounds, steps, warmup=1)
    rate = {name: tokens / seconds for name, seconds in times.items()}
    speedup = rate["joint"] / rate["per_exit"]
    per_exit_flops = sum(train_flops_per_token(config, seq_len, config.member_layers(e), 1) for e in exits)
    overhead = times["joint"] / times["hf_full_member"] - 1
    family_flops = train_flops_per_token(config, seq_len, layers + sum(
        config.branch_depth(e) for e in exits[:-1]), len(exits))
    member_flops = train_flops_per_token(config, seq_len, layers, 1)
    allowance = family_flops / member_flops - 1 + 0.10
    for name, value in rate.items():
        print(f"  {name:<15} {value:8.0f} tokens/s")
    print(f"(a) joint vs one pass per exit: {speedup:.2f}x (target >= 2x; the FLOP ratio of the two "
          f"for these exits is {per_exit_flops / family_flops:.2f}x)")
    print(f"(b) joint vs HF Qwen3 full member: overhead {overhead:+.1%}; allowance (branch FLOPs "
          f"{family_flops / member_flops - 1:+.1%} + 10%) {allowance:+.1%}")

    memory = {}
    for label, exit_count, chunked in (("chunked_1", 1, True), ("chunked_3", 3, True),
                                       ("full_logits_1", 1, False), ("full_logits_3", 3, False)):
        memory[label] = measure_memory(exit_count, chunked, args)
    mem_ratio = memory["chunked_3"] / memory["chunked_1"]
    print(f"(c) step memory at vocab {BIG_VOCAB} ({args.mem_batch}x{args.mem_seq} tokens, hidden "
          f"{args.mem_hidden}, separate heads): 1 exit {memory['chunked_1'] / 2**20:.0f} MiB, "
          f"3 exits {memory['chunked_3'] / 2**20:.0f} MiB -> {mem_ratio:.2f}x (target <= 1.25x); "
          f"full logits: {memory['full_logits_1'] / 2**20:.0f} / {memory['full_logits_3'] / 2**20:.0f} MiB "
          f"-> {memory['full_logits_3'] / memory['full_logits_1']:.2f}x")
    print(json.dumps({
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "speedup_vs_per_exit": round(speedup, 3), "speedup_target": 2.0,
        "per_exit_flop_ratio": round(per_exit_flops / family_flops, 3),
        "overhead_vs_hf": round(overhead, 4), "overhead_allowance": round(allowance, 4),
        "branch_flops_fraction": round(family_flops / member_flops - 1, 4),
        "memory_mib": {k: round(v / 2**20, 1) for k, v in memory.items()},
        "memory_ratio_3_vs_1": round(mem_ratio, 3), "memory_target": 1.25,
        "full_logits_memory_ratio_3_vs_1": round(memory["full_logits_3"] / memory["full_logits_1"], 3),
        "quick": args.quick, "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
