"""Evaluating every member in one trunk pass, against evaluating each member on its own.

1. Held-out loss: `familial.eval.perplexity.evaluate_held_out` (one trunk pass per batch for
   all exits, heads in row chunks) against one dense forward per member (`model.member(e)`,
   full logits, cross-entropy), the way separately exported members would be evaluated.
   Both must give the same loss per member.
2. Multiple-choice scoring: `score_continuations` for all exits at once against one call per
   exit, same scores required.

A random family of exits [1, 3, 5] (6 layers): timing does not depend on what it learned.
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from familial.config import FamilyConfig
from familial.data.shards import write_shards
from familial.eval.perplexity import evaluate_held_out
from familial.eval.tasks import score_continuations
from familial.model import FamilyModel


def timed(function, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


@torch.inference_mode()
def per_member_losses(model: FamilyModel, tokens: np.ndarray, seq_len: int, windows: int,
                      batch_size: int) -> dict[int, float]:
    out = {}
    for e in model.config.exits:
        member, total = model.member(e), 0.0
        for start in range(0, windows, batch_size):
            rows = range(start, min(start + batch_size, windows))
            x = torch.tensor(np.stack([tokens[w * seq_len:w * seq_len + seq_len + 1] for w in rows]))
            logits = member(x[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(),
                                     reduction="sum").item()
        out[e] = total / (windows * seq_len)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens (under a minute)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = FamilyConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, exits=[1, 3, 5],
                          max_position_embeddings=512)
    model = FamilyModel(config).eval()
    seq_len, batch_size = 256, 4
    windows = 8 if args.quick else 64
    repeats = 3 if args.quick else 5
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, size=windows * seq_len + 1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp) / "shards", [tokens], vocab_size=512)
        held, one_pass = timed(lambda: evaluate_held_out(model, shards, seq_len, batch_size=batch_size),
                               repeats)
    ours = {m["exit"]: m["loss"] for m in held.summary(resamples=10)}
    separate, per_member = timed(lambda: per_member_losses(model, tokens, seq_len, windows, batch_size),
                                 repeats)
    worst = max(abs(ours[e] - separate[e]) for e in config.exits)
    print(f"held-out loss, {windows * seq_len} tokens x {len(config.exits)} members: one pass "
          f"{one_pass:.3f}s, each member alone {per_member:.3f}s -> {per_member / one_pass:.2f}x "
          f"(largest loss difference {worst:.2e})")

    pairs = [(rng.integers(0, 512, size=int(rng.integers(32, 200))).tolist(),
              rng.integers(0, 512, size=int(rng.integers(1, 8))).tolist()) for _ in range(64)]
    together, joint = timed(lambda: score_continuations(model, config.exits, pairs), repeats)
    alone, split = timed(lambda: {e: score_continuations(model, [e], pairs)[e] for e in config.exits},
                         repeats)
    mc_worst = max(abs(a[0] - b[0]) for e in config.exits for a, b in zip(together[e], alone[e]))
    print(f"multiple-choice scoring, {len(pairs)} requests x {len(config.exits)} members: all exits "
          f"{joint:.3f}s, one exit at a time {split:.3f}s -> {split / joint:.2f}x "
          f"(largest score difference {mc_worst:.2e})")
    print(json.dumps({"held_out_tokens": windows * seq_len, "held_out_one_pass_s": round(one_pass, 4),
                      "held_out_per_member_s": round(per_member, 4),
                      "held_out_speedup": round(per_member / one_pass, 3),
                      "held_out_max_loss_diff": worst, "mc_requests": len(pairs),
                      "mc_all_exits_s": round(joint, 4), "mc_per_exit_s": round(split, 4),
                      "mc_speedup": round(split / joint, 3), "mc_max_score_diff": mc_worst,
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
