"""DaE benchmark: random vs cloned block expansion, then SVD-LLM v2 compression of the added blocks.

On the demo corpus (Python standard library source, the demo tokenizer) a small family is
trained (or loaded with --family), its small member is expanded twice from the same weights
(`random` and `clone` init) and the new blocks are trained on identical batches with
everything else frozen; held-out loss curves go to a PNG. The random-init result is then
compressed at ratios 0.2/0.4/0.6 with whitened (eigen) truncation and, as the baseline in the
same run, plain truncated SVD; the table shows the share of the added parameters removed and
the held-out loss change of the small member. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from familial.checkpoint_io import load_family
from familial.config import FamilyConfig
from familial.data.batches import StreamRows
from familial.data.demo_corpus import DEMO_VOCAB_SIZE, prepare_demo_data
from familial.eval.perplexity import evaluate_held_out
from familial.model import FamilyModel
from familial.posttrain.compress import calibration_batches, compress_member
from familial.posttrain.expand import expand_member, freeze_except, trainable_parameter_patterns


def batches(shards, seq_len: int, batch_size: int, seed: int):
    rows = StreamRows(shards, seq_len, seed)
    while True:
        drawn = [next(rows) for _ in range(batch_size)]
        yield (torch.from_numpy(np.stack([r[0] for r in drawn])),
               torch.from_numpy(np.stack([r[1] for r in drawn])))


def member_losses(model: FamilyModel, exits: list[int], ids, labels) -> torch.Tensor:
    logits = model(ids, exits=exits)
    return sum(F.cross_entropy(logits[e].flatten(0, 1), labels.flatten(), ignore_index=-100)
               for e in exits)


def train(model: FamilyModel, exits: list[int], data, steps: int, lr: float,
          curve: list | None = None, evaluate=None, every: int = 10) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=0.0, betas=(0.9, 0.95))
    for step in range(1, steps + 1):
        ids, labels = next(data)
        loss = member_losses(model, exits, ids, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        if curve is not None and (step % every == 0 or step == steps):
            curve.append((step, evaluate(model)))


def held_out_loss(model: FamilyModel, shards, seq_len: int, max_tokens: int, exit_layer: int) -> float:
    result = evaluate_held_out(model, shards, seq_len, max_tokens)
    k = result.exits.index(exit_layer)
    return float(result.loss_sums[k].sum() / result.counts.sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, under a minute on 2 cores")
    parser.add_argument("--family", help="a trained family checkpoint (default: train one here)")
    parser.add_argument("--member", default="1", help="member to expand (an early exit)")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--out", default="bench/out", help="where the PNG goes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    base_steps, expand_steps = (150, 120) if quick else (1000, 600)
    seq_len, batch_size = (64, 8) if quick else (128, 16)
    eval_tokens = 4096 if quick else 32768
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as scratch:
        train_shards, held_shards = prepare_demo_data(
            Path(scratch) / "demo", limit_bytes=600_000 if quick else 4_000_000)
        torch.manual_seed(0)
        if args.family:
            model = load_family(args.family)
        else:
            config = FamilyConfig(vocab_size=DEMO_VOCAB_SIZE, hidden_size=64, intermediate_size=192,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  exits=[1, 3], max_position_embeddings=512, rope_theta=10000.0)
            model = FamilyModel(config)
            train(model, config.exits, batches(train_shards, seq_len, batch_size, 0), base_steps, 3e-3)
        exit_layer = model.config.resolve_member(args.member)

        def evaluate(m):
            return held_out_loss(m, held_shards, seq_len, eval_tokens, exit_layer)

        base_loss = evaluate(model)
        curves, expanded = {}, {}
        for init in ("random", "clone"):
            candidate = copy.deepcopy(model)
            expand_member(candidate, exit_layer, args.blocks, init=init, seed=0)
            if abs(evaluate(candidate) - base_loss) > 1e-6:
                raise RuntimeError(f"{init} expansion changed member {exit_layer}'s held-out loss")
            freeze_except(candidate, trainable_parameter_patterns(candidate.config, exit_layer))
            curves[init] = [(0, base_loss)]
            train(candidate, [exit_layer], batches(train_shards, seq_len, batch_size, 1),
                  expand_steps, 1e-3, curves[init], evaluate, every=max(1, expand_steps // 12))
            expanded[init] = candidate.requires_grad_(True)

        png = plot(curves, Path(args.out) / "dae_expansion.png", exit_layer)
        trained = expanded["random"]
        trained_loss = curves["random"][-1][1]
        first_new = trained.config.runtime["expansion"][str(exit_layer)]["first_new_layer"]
        added = sum(p.numel() for i in range(first_new, trained.config.branch_depth(exit_layer))
                    for p in trained.branches[str(exit_layer)].layers[i].parameters())
        calibration, _ = next(batches(train_shards, seq_len, 32, 2))
        rows = []
        for ratio in (0.2, 0.4, 0.6):
            row = {"ratio": ratio}
            for method in ("eigen", "svd"):
                compressed = copy.deepcopy(trained)
                plans = compress_member(compressed, exit_layer, calibration_batches(
                    calibration, len(calibration), seq_len), ratio, method=method)
                block_plans = [p for p in plans if ".layers." in p.name]
                removed = sum(p.dense_parameters - p.parameters for p in block_plans)
                loss = evaluate(compressed)
                row[method] = {"loss": loss, "loss_change": (loss - trained_loss) / trained_loss}
                row["added_removed"] = removed / added
                row["targets_removed"] = (sum(p.dense_parameters - p.parameters for p in plans)
                                          / sum(p.dense_parameters for p in plans))
            rows.append(row)

    print(f"member {exit_layer}: loss before expansion {base_loss:.4f}; after {expand_steps} steps "
          f"of the {args.blocks} new blocks: random {curves['random'][-1][1]:.4f}, "
          f"clone {curves['clone'][-1][1]:.4f}  (curves: {png})")
    print(f"{'ratio':>6} {'added removed':>14} {'eigen loss':>11} {'change':>8} "
          f"{'svd loss':>9} {'change':>8} {'svd/eigen damage':>17}")
    for row in rows:
        e, s = row["eigen"], row["svd"]
        damage = s["loss_change"] / e["loss_change"] if e["loss_change"] > 0 else float("inf")
        row["svd_over_eigen_damage"] = damage
        print(f"{row['ratio']:>6.1f} {row['added_removed']:>14.1%} {e['loss']:>11.4f} "
              f"{e['loss_change']:>+8.2%} {s['loss']:>9.4f} {s['loss_change']:>+8.2%} {damage:>17.2f}")
    result = {
        "bench": "dae", "quick": quick, "member": exit_layer, "blocks": args.blocks,
        "base_loss": round(base_loss, 4),
        "expanded_loss": {k: round(v[-1][1], 4) for k, v in curves.items()},
        "clone_over_random_gain": round((base_loss - curves["clone"][-1][1])
                                        / max(base_loss - curves["random"][-1][1], 1e-9), 3),
        "compression": [{"ratio": r["ratio"], "added_removed": round(r["added_removed"], 4),
                         "eigen_loss_change": round(r["eigen"]["loss_change"], 4),
                         "svd_loss_change": round(r["svd"]["loss_change"], 4)} for r in rows],
        "png": str(png), "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return result


def plot(curves: dict, path: Path, exit_layer: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4))
    for init, points in curves.items():
        axis.plot([s for s, _ in points], [v for _, v in points], marker="o", label=f"{init} init")
    axis.set_xlabel("training steps of the new blocks")
    axis.set_ylabel(f"held-out loss, member {exit_layer} (nats)")
    axis.set_title("Stabilised block expansion: random vs cloned q/k/v/gate/up")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
