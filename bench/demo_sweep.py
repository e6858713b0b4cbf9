"""Sweeps behind the demo's recipe: which shape and schedule learn most in a few CPU minutes.

Each point is the demo recipe (`familial.demo.recipe.FULL`) with a few fields changed. It
trains through the same trainer and data as the demo for the CPU time that `--budget` steps
of the recipe take (timed on one thread against the recipe, interleaved, so that load on a
shared machine inflates both alike), then evaluates every member on the held-out files.
Losses after N steps do not depend on load, so points compare fairly on a busy machine; only
the step counts rest on the timing. Points that change nothing a step costs (learning rates,
schedules, exit weights) run exactly `--budget` steps with `--same-cost`. Points with
different vocabularies also compare in nats per byte of held-out text (a token of a larger
vocabulary covers more text). The bigram column is the interpolated Kneser-Ney bigram
fitted to the same training tokens (familial.eval.ngram).

    python bench/demo_sweep.py --group lr --budget 600 --same-cost   # appends to --results
    python bench/demo_sweep.py --group width --budget 600
    python bench/demo_sweep.py --table                                 # Markdown table of all

The last line printed is one JSON object of the points run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from familial.checkpoint_io import load_family
from familial.data.shards import TokenShards
from familial.demo.corpus import held_out_bytes_per_token, prepare_corpus
from familial.demo.recipe import FULL, DemoPlan, train_config
from familial.eval.ngram import Bigram, stream
from familial.eval.perplexity import evaluate_held_out
from familial.train.config import load_config
from familial.train.loop import Trainer

GROUPS: dict[str, dict[str, dict]] = {
    "recipe": {"recipe": {}},
    "lr": {"lr1e-3": {"lr": 1e-3}, "lr1.5e-3": {"lr": 1.5e-3}, "lr3e-3": {"lr": 3e-3}},
    "low-lr": {"lr7e-4": {"lr": 7e-4}, "lr5e-4": {"lr": 5e-4}},
    "schedule": {"cosine": {"lr_kind": "cosine"}, "wsd-0.5": {"decay_fraction": 0.5}},
    "batch": {"b2": {"batch_size": 2}, "b8": {"batch_size": 8}},
    "vocab": {"v384": {"vocab_size": 384}, "v1024": {"vocab_size": 1024}},
    "small-vocab": {"v320": {"vocab_size": 320}, "v259": {"vocab_size": 259}},
    "width": {"h96": {"hidden_size": 96, "intermediate_size": 288},
              "h160": {"hidden_size": 160, "intermediate_size": 480}},
    "seq": {"t64": {"seq_len": 64, "batch_size": 8}, "t256": {"seq_len": 256, "batch_size": 2}},
    "exits": {"three-of-8": {"exits": (1, 3, 7), "names": ("small", "medium", "full")},
              "four-of-6": {"layers": 6, "exits": (0, 1, 3, 5)},
              "three-of-6": {"layers": 6, "exits": (1, 3, 5), "names": ("small", "medium", "full")}},
    "weights": {"decay-shallow": {"exit_weights": {"tiny": (1.0, 0.3), "small": (1.0, 0.5)}},
                "deep-heavy": {"exit_weights": {"tiny": 0.5, "small": 0.75, "medium": 1.0, "full": 1.5}}},
}
# The second round starts from the first round's best vocabulary (384 ids).
for _group in ("width", "seq", "exits", "weights", "lr", "low-lr", "batch"):
    GROUPS[f"{_group}-v384"] = {name: {"vocab_size": 384, **changes}
                                for name, changes in GROUPS[_group].items()}
# The third round starts from the second's best: 384 ids, lr 7e-4, a 6-layer trunk with
# exits 0/1/3/5 (members of 1, 2, 4 and 6 layers).
GROUPS.update({
    "r3-base": {"r3-base": {}},
    "r3-exits": {"1-3-6": {"exits": (0, 2, 5), "names": ("small", "medium", "full")},
                 "2-4-6": {"exits": (1, 3, 5), "names": ("small", "medium", "full")}},
    "r3-weights": {"decay-shallow": {"exit_weights": {"tiny": (1.0, 0.3), "small": (1.0, 0.5)}},
                   "deep-heavy": {"exit_weights": {"tiny": 0.5, "small": 0.75, "medium": 1.0, "full": 1.5}}},
    "r3-width": {"h96": {"hidden_size": 96, "intermediate_size": 288},
                 "h160": {"hidden_size": 160, "intermediate_size": 480}},
    "r3-batch": {"b2": {"batch_size": 2}, "b8": {"batch_size": 8}},
    "r3-seq": {"t64": {"seq_len": 64, "batch_size": 8}, "t256": {"seq_len": 256, "batch_size": 2}},
    "r3-schedule": {"cosine": {"lr_kind": "cosine"}},
})
# The fourth round starts from the third's best (width 96) and runs at about the budget of
# the demo itself (3000 steps of the recipe).
GROUPS.update({
    "r4-base": {"r4-base": {}},
    "r4-width": {"h64": {"hidden_size": 64, "intermediate_size": 192},
                 "h128": {"hidden_size": 128, "intermediate_size": 384}},
    "r4-depth": {"1-2-4-8": {"layers": 8, "exits": (0, 1, 3, 7)},
                 "1-3-6": {"exits": (0, 2, 5), "names": ("small", "medium", "full")}},
    "r4-lr": {"lr1e-3": {"lr": 1e-3}, "lr5e-4": {"lr": 5e-4}},
    "r4-batch": {"b8": {"batch_size": 8}},
    "r4-weights": {"decay-shallow": {"exit_weights": {"tiny": (1.0, 0.3), "small": (1.0, 0.5)}}},
    "r4-seq": {"t64": {"seq_len": 64, "batch_size": 8}},
})


def _cpu_seconds_of_run(plan: DemoPlan, data_dir: Path, tokenizer_dir: Path, run_dir: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    config = train_config(plan, data_dir, run_dir, tokenizer_dir, 0)
    config["log"]["progress"] = False
    started = time.process_time()
    Trainer(load_config(data=config)).run()
    return time.process_time() - started


def relative_cost(plan: DemoPlan, cache: Path, work: Path) -> tuple[float, float]:
    """(CPU seconds per step of `plan`, the same of the recipe): one thread, interleaved.

    Each is the difference of a 15-step and a 3-step run (which cancels the model's
    construction and the final checkpoint), after a 2-step run that takes one-time costs.
    Process CPU time hardly advances while other jobs hold the core, and the two plans are
    timed alternately, so load that comes and goes inflates both alike: their ratio is what
    the step counts of a sweep rest on.
    """
    seconds: dict[tuple[int, int], float] = {}
    for n in (2, 3, 15):
        for k, p in enumerate((FULL, plan)):
            tokenizer_dir, data_dir = prepare_corpus(p, cache)
            seconds[k, n] = _cpu_seconds_of_run(replace(p, steps=n, warmup_steps=1), data_dir,
                                                tokenizer_dir, work / "probe")
    shutil.rmtree(work / "probe", ignore_errors=True)
    return ((seconds[1, 15] - seconds[1, 3]) / 12, (seconds[0, 15] - seconds[0, 3]) / 12)


def run_point(name: str, plan: DemoPlan, budget: int, cache: Path, work: Path,
              same_cost: bool = False) -> dict:
    """Train `plan` for the CPU time of `budget` steps of the recipe (exactly `budget` steps
    with `same_cost`, for points whose steps cost what the recipe's do)."""
    tokenizer_dir, data_dir = prepare_corpus(plan, cache)
    step_s, reference_s = relative_cost(plan, cache, work)
    steps = budget if same_cost else max(20, round(budget * reference_s / step_s))
    plan = replace(plan, steps=steps, warmup_steps=max(1, round(steps * plan.warmup_steps / FULL.steps)))
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = train_config(plan, data_dir, run_dir, tokenizer_dir, 0)
    config["log"]["progress"] = False
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer = Trainer(load_config(data=config))
    trainer.run()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    model = load_family(trainer.final_family()).eval()
    held_out = TokenShards(data_dir / "held_out")
    result = evaluate_held_out(model, held_out, plan.seq_len, max_tokens=plan.eval_tokens)
    losses = result.loss_sums.sum(1) / result.counts.sum()
    per_byte = 1 / held_out_bytes_per_token(plan, data_dir)
    train_tokens = stream(TokenShards(data_dir / "train"))
    bigram = Bigram(train_tokens, plan.vocab_size)
    ids = stream(held_out)[:plan.eval_tokens + 1]
    bigram_loss = float(bigram.nll(ids[:-1], ids[1:]).mean())
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"name": name, "plan": asdict(plan),
            "steps": steps, "step_s": step_s, "reference_step_s": reference_s, "tokens_seen": steps * plan.seq_len * plan.batch_size,
            "train_tokens": len(train_tokens), "wall_s": wall, "cpu_s": cpu,
            "members": list(plan.names), "loss": [float(x) for x in losses],
            "nats_per_byte": [float(x * per_byte) for x in losses],
            "bigram": bigram_loss, "bigram_nats_per_byte": bigram_loss * per_byte}


def table(records: list[dict]) -> str:
    lines = [("| group | point | vocab | width x layers | exits | seq x batch | lr | steps | CPU s/step "
             "| tokens seen | member losses (nats/token) | full below smallest | bigram | full, nats/byte "
             "| bigram, nats/byte |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        p = r["plan"]
        drop = 1 - r["loss"][-1] / r["loss"][0]
        weights = f" ({p['exit_weights']})" if p["exit_weights"] else ""
        lines.append(f"| {r['group']} | {r['name']} | {p['vocab_size']} | {p['hidden_size']} x {p['layers']} "
                     f"| {','.join(map(str, p['exits']))}{weights} | {p['seq_len']} x {p['batch_size']} "
                     f"| {p['lr']:g} {p['lr_kind']} | {r['steps']} | {r['step_s']:.3f} "
                     f"| {r['tokens_seen'] / 1e3:.0f}k | {' / '.join(f'{x:.3f}' for x in r['loss'])} "
                     f"| {drop:.1%} | {r['bigram']:.3f} | {r['nats_per_byte'][-1]:.3f} "
                     f"| {r['bigram_nats_per_byte']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--group", choices=sorted(GROUPS), help="points to run")
    parser.add_argument("--only", help="comma-separated point names of the group")
    parser.add_argument("--budget", type=int, default=600,
                        help="per point, the CPU time of this many steps of the recipe")
    parser.add_argument("--same-cost", action="store_true",
                        help="train every point exactly --budget steps (points whose steps cost "
                             "what the recipe's do, e.g. learning rates)")
    parser.add_argument("--quick", action="store_true", help="one tiny point, to check the script")
    parser.add_argument("--results", default="bench/out/demo_sweep.jsonl")
    parser.add_argument("--work", default="bench/out/demo_sweep")
    parser.add_argument("--table", action="store_true", help="print the results as a Markdown table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = Path(args.results)
    if args.table:
        records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        print(table(records))
        return {"points": len(records)}
    work = Path(args.work)
    if args.quick:
        points = {"quick": {"hidden_size": 64, "intermediate_size": 192, "layers": 4, "exits": (1, 3),
                            "names": ("small", "full"), "corpus_bytes": 400_000, "eval_tokens": 4096}}
        group, budget = "quick", 20
    else:
        if not args.group:
            parser.error("--group is required (or --table, --quick)")
        points, group, budget = GROUPS[args.group], args.group, args.budget
        if args.only:
            points = {k: points[k] for k in args.only.split(",")}
    results.parent.mkdir(parents=True, exist_ok=True)
    done = []
    for name, overrides in points.items():
        record = run_point(name, replace(FULL, **overrides), budget, work / "cache", work, args.same_cost)
        record["group"] = group
        done.append(record)
        print(table([record]).splitlines()[-1], flush=True)
        if not args.quick:
            with open(results, "a") as handle:
                handle.write(json.dumps(record) + "\n")
    summary = {"group": group, "points": {r["name"]: {"loss": r["loss"], "bigram": r["bigram"],
                                                      "nats_per_byte": r["nats_per_byte"]} for r in done}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
