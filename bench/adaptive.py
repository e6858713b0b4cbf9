"""Adaptive depth (`auto`) on a trained family: speed against the full member, at a stated quality.

The family: --family DIR (a family checkpoint or a demo's output directory); else as
bench/decode.py finds one (runs/demo, bench/out/demo, or with --quick the quick demo family,
trained once into bench/out/demo-quick). Its held-out tokens: --data, else the demo's
data-*/held_out beside the run.
1. Calibration, in memory (nothing is written): every decision measure (top1, margin,
   saturation, classifier) on the first held-out windows, target 0.95.
2. Prompts: the first 16 tokens of later held-out windows, which calibration did not see.
3. A speed/quality curve per measure, along its calibrated path (exits off, then operating
   points for lower and lower targets; the one for 0.95 is marked), at batch 1 (each prompt
   alone) and batch 8 (8 prompts together, sequences leaving at different depths):
   tokens/s against the full member (timed in turn with each point), token agreement (at each generated
   position, is the token the full member's greedy choice on the same prefix?), the held-out
   loss of the generated text under the full member (mean negative log-likelihood of the
   generated tokens; the full member's own greedy text for reference), and mean depth.
4. The skipped layers' KV at the classifier's operating point: recompute (exact) vs copy (CALM).
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from decode import find_family, trained_family
from familial.checkpoint_io import load_family
from familial.infer import Engine, SamplingParams
from familial.infer.adaptive import MEASURES, operating_point
from familial.infer.calibrate import calibrate, load_token_ids
from timing import CLOCKS, add_clock_argument

PROMPT_TOKENS = 16


def held_out_data(family_dir: Path) -> Path | None:
    """The demo's held-out shards beside a family it trained (…/data-*/held_out)."""
    for parent in list(family_dir.parents)[:4]:
        found = sorted(parent.glob("data-*/held_out"))
        if found:
            return found[-1]
    return None


def best_time(fn, repeats: int, clock) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = clock()
        result = fn()
        best = min(best, clock() - started)
    return best, result


@torch.inference_mode()
def quality(model, prompts: list[list[int]], outputs: list[list[int]]) -> tuple[float, float]:
    """Token agreement with the full member's greedy choice on each generated prefix, and the
    full member's mean negative log-likelihood of the generated tokens."""
    agree = total = 0
    nll = 0.0
    full = model.config.exits[-1]
    for prompt, tokens in zip(prompts, outputs):
        ids = torch.tensor([prompt + tokens])
        logits = model(ids, exits=[full])[full][0, len(prompt) - 1:-1].float()
        target = torch.tensor(tokens)
        agree += int((logits.argmax(-1) == target).sum())
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        total += len(tokens)
    return agree / total, nll / total


def curve_targets(quick: bool) -> list[float]:
    """Operating points measured along each path: exits off (target 1), then lower targets."""
    return [1.0, 0.97, 0.95, 0.9] if quick else [1.0, 0.99, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8]


def measure(engine: Engine, model, prompts: list[list[int]], batch_prompts: list[list[int]],
            params: SamplingParams, repeats: int, clock, member: int | str = "auto") -> dict:
    """Batch-1 and batch-8 speed and quality of `member`. Its speed is against the full member
    timed in turn with it (full, then `member`, `repeats` times; best of each), so a load that
    comes and goes on a shared machine weighs on both sides of the ratio alike."""
    figures = {}
    for name, group, together in (("batch_1", prompts, False), ("batch_8", batch_prompts, True)):
        if together:
            def run(member, group=group):
                return engine.generate(group, params=params, member=member)
        else:
            def run(member, group=group):
                return [engine.generate([p], params=params, member=member)[0] for p in group]
        full_s = seconds = float("inf")
        for _ in range(repeats):
            if member != -1:
                full_s = min(full_s, best_time(lambda: run(-1), 1, clock)[0])
            took, results = best_time(lambda: run(member), 1, clock)
            seconds = min(seconds, took)
        full_s = seconds if member == -1 else full_s
        tokens = sum(len(r.token_ids) for r in results)
        exits = [e for r in results for e in r.exits]
        agreement, loss = quality(model, group, [r.token_ids for r in results])
        figures[name] = {"tokens_per_s": round(tokens / seconds, 1),
                         "full_tokens_per_s": round(tokens / full_s, 1),
                         "speedup": round(full_s / seconds, 3),
                         "agreement": round(agreement, 4), "full_member_loss": round(loss, 4),
                         "mean_depth": round(sum(model.config.member_layers(e) for e in exits)
                                             / len(exits) / model.config.num_hidden_layers, 3)}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts, tokens and curve points (CI)")
    parser.add_argument("--family", help="trained family checkpoint directory (or a demo's output directory)")
    parser.add_argument("--data", help="held-out tokens (shards directory, .npy or text of ids)")
    parser.add_argument("--tokens", type=int, help="new tokens per generation")
    parser.add_argument("--prompts", type=int, help="prompts at batch 1")
    parser.add_argument("--target", type=float, default=0.95, help="agreement target of the marked point")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    add_clock_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    family_dir, source = trained_family(args)
    data = Path(args.data) if args.data else held_out_data(find_family(family_dir) or family_dir)
    if data is None:
        raise SystemExit(f"no held-out data found beside {family_dir}: pass --data")
    new_tokens = args.tokens or (32 if args.quick else 64)
    count = args.prompts or (2 if args.quick else 4)
    repeats = 2 if args.quick else 5
    model = load_family(family_dir).eval()
    ids = load_token_ids(data)
    window = 128
    calibration_tokens = min(len(ids) // 2, 8192 if args.quick else 32768)
    started = time.perf_counter()
    calibration = calibrate(model, ids[:calibration_tokens], target=args.target, seq_len=window,
                            max_tokens=calibration_tokens)
    calibrate_s = time.perf_counter() - started
    later = ids[calibration_tokens:]
    starts = range(0, len(later) - PROMPT_TOKENS, max(window, (len(later) - PROMPT_TOKENS) // 8))
    pool = [later[s:s + PROMPT_TOKENS].tolist() for s in starts][:8]
    if len(pool) < 8:
        raise SystemExit(f"{data}: too few held-out tokens after calibration for 8 prompts")
    prompts, batch_prompts = pool[:count], pool
    print(f"family: {source}; held-out data: {data}")
    print(f"tokens/s by {args.clock} time with {args.threads} thread(s), best of {repeats}; {new_tokens} new "
          f"tokens per prompt, greedy; batch 1 = {len(prompts)} prompts one at a time, batch 8 = 8 prompts "
          f"together; calibration on {calibration.tokens} held-out tokens took {calibrate_s:.1f} s")
    params = SamplingParams(max_new_tokens=new_tokens, greedy=True)
    engines = {kv: Engine(model, max_batch_size=8, max_seq_len=PROMPT_TOKENS + new_tokens + 8, exit_kv=kv,
                          early_exit=calibration.early_exit())
               for kv in ("recompute", "copy")}
    for engine in engines.values():
        # Every run decodes exactly new_tokens, so speeds compare.
        engine.eos = set()
    engine = engines["recompute"]
    full = measure(engine, model, prompts, batch_prompts, params, repeats, clock, member=-1)
    print(f"full member: batch 1 {full['batch_1']['tokens_per_s']:.1f} tok/s, batch 8 "
          f"{full['batch_8']['tokens_per_s']:.1f} tok/s; its own text: loss {full['batch_1']['full_member_loss']:.3f}")
    figures = {"source": source, "threads": args.threads, "clock": args.clock, "new_tokens": new_tokens,
               "target": args.target, "calibration_tokens": calibration.tokens, "calibrate_s": round(calibrate_s, 1),
               "full": full,
               "measures": {}}
    for name in MEASURES:
        points = calibration.tables[name]["points"]
        marked = operating_point(points, args.target) or points[0]
        rows = []
        seen = set()
        for target in sorted(set(curve_targets(args.quick)) | {args.target}, reverse=True):
            point = operating_point(points, target) or points[0]
            if point["k"] in seen:
                continue
            seen.add(point["k"])
            engine.early_exit = calibration.early_exit(name, target)
            row = {"target": target, "k": point["k"], "calibrated_agreement": point["agreement"],
                   "lower_bound": point["lower_bound"], "expected_layer_speedup": point["speedup"],
                   "expected_speedup_with_checks": point.get("speedup_with_checks"),
                   "exits_checked": [int(e) for e, t in point["thresholds"].items() if t < 1],
                   "marked": point is marked}
            row.update(measure(engine, model, prompts, batch_prompts, params, repeats, clock))
            rows.append(row)
            print(f"{name:10s} target {target:.2f} (k {point['k']:.2f}{', calibrated point' if row['marked'] else ''}): "
                  + "; ".join(f"{b.replace('_', ' ')} {row[b]['speedup']:.2f}x, agreement {row[b]['agreement']:.3f}, "
                              f"loss {row[b]['full_member_loss']:.3f}, depth {row[b]['mean_depth']:.0%}"
                              for b in ("batch_1", "batch_8")))
        figures["measures"][name] = rows
    kv = {}
    for mode, kv_engine in engines.items():
        kv_engine.early_exit = calibration.early_exit("classifier", args.target)
        kv[mode] = measure(kv_engine, model, prompts, batch_prompts, params, repeats, clock)
        print(f"skipped layers' KV by {mode}: " + "; ".join(
            f"{b.replace('_', ' ')} {kv[mode][b]['speedup']:.2f}x, agreement {kv[mode][b]['agreement']:.3f}"
            for b in ("batch_1", "batch_8")))
    figures["kv"] = kv
    marked = {name: next(r for r in rows if r["marked"]) for name, rows in figures["measures"].items()}
    off = figures["measures"]["classifier"][0]
    figures["summary"] = {
        "exits_off_speedup_batch_1": off["batch_1"]["speedup"],
        "calibrated_speedup_batch_1": {n: r["batch_1"]["speedup"] for n, r in marked.items()},
        "calibrated_speedup_batch_8": {n: r["batch_8"]["speedup"] for n, r in marked.items()},
        "calibrated_agreement_batch_1": {n: r["batch_1"]["agreement"] for n, r in marked.items()}}
    print(f"summary: exits off {off['batch_1']['speedup']:.2f}x; at the {args.target} point, batch 1: "
          + ", ".join(f"{n} {r['batch_1']['speedup']:.2f}x" for n, r in marked.items()))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
