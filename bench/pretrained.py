"""Members of a family made from a pretrained model, against its full member, on held-out text.

For a family whose exits were trained on a frozen trunk (docs/pretrained.md), on prompts cut
from held-out token shards (--data, text of the training text's kind):
1. Greedy agreement in generation of each member with the full member (at each generated
   position, is the member's token the full member's greedy choice on the same prefix?).
2. Self-speculative decoding of the full member with each smaller member drafting, against
   plain greedy decoding of the full member, timed in turns (best of --repeats), at identical
   output (checked), with each drafter's acceptance.
3. Adaptive depth: calibrated on the first held-out tokens (familial.infer.calibrate, --metric,
   --target), then generated with member "auto" against the full member, timed in turns, with
   the agreement measured in generation beside the calibrated target.
Without --family (or with --quick and no --family) it runs on bench/decode.py's tiny Markov
family, trained here in seconds, so the bench itself is checked without any real model.
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from adaptive import quality
from decode import markov_batch, markov_chain, train_tiny_family
from familial.checkpoint_io import load_family
from familial.infer import Engine, SamplingParams
from familial.infer.adaptive import MEASURES
from familial.infer.calibrate import calibrate, load_token_ids
from timing import CLOCKS, add_clock_argument, race

def generate_all(engine: Engine, prompts: list[list[int]], member, params: SamplingParams, **options) -> list:
    return [engine.generate([p], member, params, **options)[0] for p in prompts]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few prompts and tokens (CI)")
    parser.add_argument("--family", help="family checkpoint directory (default: a tiny Markov family trained here)")
    parser.add_argument("--data", help="held-out token shards (required with --family)")
    parser.add_argument("--prompts", type=int, help="prompts, each alone (batch 1)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--tokens", type=int, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, help="timed turns per contender (best counts)")
    parser.add_argument("--drafters", help="comma-separated drafting exits (default: every smaller member)")
    parser.add_argument("--metric", choices=list(MEASURES), default="classifier", help="adaptive depth's measure")
    parser.add_argument("--target", type=float, default=0.9, help="adaptive depth's calibrated agreement target")
    parser.add_argument("--calibration-tokens", type=int, help="held-out tokens calibration uses")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    add_clock_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    if args.family and not args.data:
        raise SystemExit("--family needs --data (held-out token shards)")
    new_tokens = args.tokens or (24 if args.quick else 64)
    count = args.prompts or (2 if args.quick else 6)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.family:
        model = load_family(args.family).eval()
        ids = load_token_ids(args.data)
        source = args.family
    else:
        model = train_tiny_family(150)
        ids = markov_batch(markov_chain(), 1, 6000, torch.Generator().manual_seed(5))[0].numpy()
        source = "tiny family trained in this run on a synthetic Markov language"
    config = model.config
    full = config.exits[-1]
    calibration_tokens = args.calibration_tokens or min(len(ids) // 2, 4096 if args.quick else 16384)
    later = ids[calibration_tokens:]
    stride = max(args.prompt_tokens, (len(later) - args.prompt_tokens) // count)
    prompts = [later[s:s + args.prompt_tokens].tolist() for s in range(0, stride * count, stride)]
    if len(prompts) < count or any(len(p) < args.prompt_tokens for p in prompts):
        raise SystemExit(f"{args.data}: too few held-out tokens after calibration for {count} prompts")
    engine = Engine(model, max_batch_size=1, max_seq_len=args.prompt_tokens + new_tokens + 16)
    engine.eos = set()  # every run decodes exactly new_tokens, so speeds compare
    params = SamplingParams(max_new_tokens=new_tokens, greedy=True)
    print(f"family: {source}; {count} prompts of {args.prompt_tokens} held-out tokens, {new_tokens} new tokens, "
          f"greedy, batch 1; seconds by {args.clock} time with {args.threads} thread(s), best of {repeats} turns")
    figures: dict = {"source": source, "threads": args.threads, "clock": args.clock, "prompts": count,
                     "new_tokens": new_tokens, "members": {}, "speculative": {}}

    generate_all(engine, prompts, full, params)
    for exit_layer in config.exits[:-1]:
        outputs = generate_all(engine, prompts, exit_layer, params)
        agreement, loss = quality(model, prompts, [r.token_ids for r in outputs])
        figures["members"][str(exit_layer)] = {"agreement": round(agreement, 4), "full_member_loss": round(loss, 4)}
        print(f"exit-{exit_layer}: greedy agreement with the full member in generation {agreement:.1%}, "
              f"full member's loss of its text {loss:.3f}")

    drafters = ([int(d) for d in args.drafters.split(",")] if args.drafters else config.exits[:-1])
    contenders = {"plain": lambda: generate_all(engine, prompts, full, params)}
    contenders.update({str(d): (lambda d=d: generate_all(engine, prompts, full, params, speculative=d))
                       for d in drafters})
    timed = race(contenders, repeats, clock)
    plain_s, plain = timed["plain"]
    figures["plain_tokens_per_s"] = round(count * new_tokens / plain_s, 2)
    print(f"full member, plain: {count * new_tokens / plain_s:.1f} tok/s")
    for d in drafters:
        seconds, results = timed[str(d)]
        drafted = sum(r.drafted for r in results)
        accepted = sum(r.accepted for r in results)
        identical = [r.token_ids for r in results] == [r.token_ids for r in plain]
        row = {"speedup": round(plain_s / seconds, 3), "identical": identical, "drafted": drafted,
               "acceptance": round(accepted / max(1, drafted), 4)}
        figures["speculative"][str(d)] = row
        print(f"exit-{d} drafting: {row['speedup']:.2f}x plain, {row['acceptance']:.1%} of {drafted} drafts "
              f"accepted, identical output: {identical}")

    started = time.perf_counter()
    calibration = calibrate(model, ids[:calibration_tokens], target=args.target, metric=args.metric,
                            seq_len=128, max_tokens=calibration_tokens)
    figures["calibrate_s"] = round(time.perf_counter() - started, 1)
    engine.early_exit = calibration.early_exit(args.metric, args.target)
    point = calibration.settings(args.metric, args.target)
    timed = race({"plain": lambda: generate_all(engine, prompts, full, params),
                  "auto": lambda: generate_all(engine, prompts, "auto", params)}, repeats, clock)
    (plain_s, _), (auto_s, auto) = timed["plain"], timed["auto"]
    agreement, loss = quality(model, prompts, [r.token_ids for r in auto])
    exits = [e for r in auto for e in r.exits]
    depth = sum(config.member_layers(e) for e in exits) / len(exits) / config.num_hidden_layers
    figures["adaptive"] = {"metric": args.metric, "target": args.target, "calibration_tokens": calibration_tokens,
                           "thresholds": point.get("thresholds"), "speedup": round(plain_s / auto_s, 3),
                           "agreement": round(agreement, 4), "full_member_loss": round(loss, 4),
                           "mean_depth": round(depth, 3)}
    print(f"adaptive ({args.metric}, target {args.target}): {plain_s / auto_s:.2f}x the full member, agreement "
          f"in generation {agreement:.1%}, mean depth {depth:.0%}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
