"""`familial generate` (stream a member's answer) and `familial calibrate` (early-exit thresholds)."""

from __future__ import annotations

import argparse
import sys
import time

from familial.commands import arguments
from familial.infer.adaptive import MEASURES
from familial.infer.sampling import SamplingParams


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids like '1 2 3' or '1,2,3', got '{text}'") from None


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="family checkpoint directory")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs tokenizer.json in the family directory)")
    prompt.add_argument("--prompt-ids", type=_ids, help="prompt as token ids, e.g. '1,2,3'")
    parser.add_argument("--member", default="-1",
                        help="exit index, exit-E, alias, -1 (full) or auto (adaptive exit; on a family "
                             "`familial calibrate` has not seen, mostly the full member)")
    parser.add_argument("--budget", type=float,
                        help="adaptive exit with a cap on average depth (fraction of layers)")
    parser.add_argument("--target", type=float,
                        help="adaptive exit at the calibrated operating point for this agreement "
                             "with the full member (needs familial calibrate)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--speculative", nargs="?", const="true",
                        help="self-speculative decoding: no value = the smallest member drafts; "
                             "a member (or 'a,b') drafts; 'cascade' = every smaller member, alone or "
                             "in a chain, as measured acceptance favours (drafting pauses while it "
                             "does not pay)")
    parser.add_argument("--show-exits", action="store_true", help="print the exit after each token")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: one per core from hidden 512 up, else 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights and KV cache precision (default: the checkpoint's)")


@arguments(_generate_arguments)
def generate(args: argparse.Namespace) -> int:
    import torch

    from familial.infer.adaptive import uncalibrated_note
    from familial.infer.engine import Engine, suggested_threads

    engine = Engine.from_checkpoint(args.family, max_batch_size=1, dtype=args.dtype)
    threads = args.threads or suggested_threads(engine.config)
    if threads:
        torch.set_num_threads(threads)
    prompt = _prompt_ids(engine, args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            stop=args.stop, seed=args.seed, greedy=args.greedy)
    speculative = {None: None, "true": True}.get(args.speculative, args.speculative)
    handle = engine.submit(prompt, member=args.member, params=params, speculative=speculative,
                           budget=args.budget, target=args.target)
    note = uncalibrated_note(engine.config)
    if args.member == "auto" and args.budget is None and args.target is None and note:
        print(f"[note: {note}]", file=sys.stderr, flush=True)
    # The engine steps on this thread, which loaded the model (Engine.run), and the answer is
    # written from another.
    return engine.run_with(lambda: _stream(engine, handle, args.show_exits))


def _prompt_ids(engine, args: argparse.Namespace) -> list[int]:
    if args.prompt is None:
        return args.prompt_ids
    if engine.tokenizer is None:
        raise ValueError(f"{args.family}: no tokenizer.json, so --prompt cannot be tokenised; "
                         f"pass --prompt-ids instead")
    return engine.tokenizer.encode(args.prompt).ids


def _stream(engine, handle, show_exits: bool) -> int:
    """Write each token as it comes, then the speed and depth to stderr; 1 if the engine failed."""
    started = time.perf_counter()
    exits = []
    for event in handle:
        if event.token_id is not None:
            exits.append(event.exit)
            text = event.text if engine.tokenizer is not None else f"{event.token_id} "
            if show_exits:
                text += f"[{event.exit}]"
            sys.stdout.write(text)
            sys.stdout.flush()
        if event.finished:
            if event.error:
                print(f"\nfamilial generate: error: {event.error}", file=sys.stderr)
                return 1
            elapsed = time.perf_counter() - started
            mean_depth = sum(engine.config.member_layers(e) for e in exits) / max(1, len(exits))
            print(f"\n[{len(exits)} tokens, {len(exits) / elapsed:.1f} tokens/s, finish: "
                  f"{event.finish_reason}, mean depth {mean_depth:.1f} layers]", file=sys.stderr)
            stats = handle.speculative_stats()
            if stats is not None:
                print(f"[speculative: {stats['drafted']} tokens drafted, {stats['accepted']} accepted "
                      f"({stats['acceptance_rate']:.0%} acceptance), {len(exits) / elapsed:.1f} tokens/s; "
                      f"drafting pauses while it does not pay]", file=sys.stderr)
    return 0


def _calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="family checkpoint directory")
    parser.add_argument("--data", required=True,
                        help="held-out tokens: token shards directory, .npy, or text of ids")
    parser.add_argument("--target", type=float, default=0.95,
                        help="token agreement with the full member's top-1 to guarantee (every token "
                             "decided on the true prefix)")
    parser.add_argument("--delta", type=float, default=0.05,
                        help="the guarantee holds with probability 1 - delta over the held-out tokens")
    parser.add_argument("--metric", choices=list(MEASURES), default="classifier",
                        help="decision measure of the default rule (every measure's table is stored)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--dry-run", action="store_true", help="print the calibration without writing")


@arguments(_calibrate_arguments)
def calibrate(args: argparse.Namespace) -> int:
    from familial.checkpoint_io import load_family
    from familial.infer.adaptive import operating_point
    from familial.infer.calibrate import calibrate, load_token_ids, write_early_exit

    model = load_family(args.family)
    result = calibrate(model, load_token_ids(args.data), target=args.target, metric=args.metric,
                       delta=args.delta, seq_len=args.seq_len, max_tokens=args.max_tokens)
    settings = result.settings()
    print(f"{result.tokens} held-out tokens, half to fit, half to test; guarantee: with probability "
          f">= {1 - args.delta:.0%}, token agreement with the full member >= {args.target} (tokens taken "
          f"as independent draws)")
    for measure, table in result.tables.items():
        point = operating_point(table["points"], args.target) or table["points"][0]
        print(f"  {measure:10s} agreement {point['agreement']:.4f} (lower bound {point['lower_bound']:.4f}), "
              f"{point['layers']:.2f} layers per token = {point['speedup']:.2f}x fewer"
              + ("  <- stored as the default rule" if measure == settings["metric"] else ""))
    point = settings["operating_point"]
    for exit_layer, share in point["exits"].items():
        agreement = "-" if share["agreement"] is None else f"{share['agreement']:.4f}"
        threshold = settings["thresholds"].get(exit_layer)
        print(f"    exit {exit_layer}: {share['share']:.1%} of tokens leave here, agreement {agreement}"
              + (f", threshold {threshold:.4f}" if threshold is not None else ""))
    if not args.dry_run:
        print(f"wrote runtime.early_exit to {write_early_exit(args.family, settings, result.classifier)}")
    return 0
