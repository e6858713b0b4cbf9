"""`familial eval` (per-member loss, perplexity, agreement, tasks, cost), `familial report` and
`familial compare` (members against n-gram baselines, `familial.eval.evidence`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from familial.checkpoint_io import DTYPES, load_family
from familial.commands import arguments
from familial.eval.cost import measure_latency, member_costs
from familial.staging import check_output_file, write_text_atomically
from familial.summary import format_count


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="family checkpoint directory")
    parser.add_argument("--data", help="held-out token shards (from `familial data prepare`)")
    parser.add_argument("--tasks", nargs="+", default=[], metavar="JSONL",
                        help="task files (multiple choice or generation, see familial.eval.tasks)")
    parser.add_argument("--seq-len", type=int, help="window length (default: min(1024, max positions))")
    parser.add_argument("--max-tokens", type=int, default=1_000_000,
                        help="evaluate at most this many tokens of --data (default 1M; 0 = all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="generation limit for items that set none")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--prompt-tokens", type=int,
                        help="prefill length for latency (default: 128, or less to fit the positions)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decoded tokens for latency")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per member (median)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: 1 for small families, else torch's)")
    parser.add_argument("--json", dest="json_out", help="write every figure to this JSON file")


@arguments(_eval_arguments)
def evaluate(args: argparse.Namespace) -> int:
    if args.json_out:
        check_output_file(Path(args.json_out))  # before the evaluation, not after it
    result = measure(args)
    print(format_table(result))
    if args.json_out:
        target = Path(args.json_out)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(target, json.dumps(result, indent=2) + "\n")
        print(f"wrote {target}")
    return 0


def measure(args: argparse.Namespace) -> dict:
    """Every figure of `familial eval`: per member, then what they were measured on."""
    _check_options(args)
    from familial.infer.engine import suggested_threads

    model = load_family(args.family, dtype=DTYPES[args.dtype], device=args.device).eval()
    config = model.config
    threads = args.threads or suggested_threads(config)
    if threads:
        torch.set_num_threads(threads)
    seq_len = args.seq_len or min(1024, config.max_position_embeddings)
    if seq_len < 1:
        raise ValueError(f"--seq-len {seq_len}: expected a positive integer")
    members = {m["exit"]: m for m in member_costs(config, seq_len)}
    result: dict = {"family": str(args.family), "exits": list(config.exits)}
    if args.data:
        result.update(_held_out(args, model, seq_len, members))
    if args.tasks:
        _tasks(args, model, members)
    if not args.no_latency:
        result["latency"] = _latency(args, model, members)
    result["members"] = [members[e] for e in config.exits]
    return result


def _check_options(args: argparse.Namespace) -> None:
    if not args.data and not args.tasks:
        raise ValueError("nothing to evaluate: pass --data SHARDS and/or --tasks FILE.jsonl")
    for name in ("batch_size", "bootstrap", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: expected a positive integer")


def _held_out(args: argparse.Namespace, model, seq_len: int, members: dict) -> dict:
    """Loss, perplexity and agreement of each member on --data (into `members`); -> what they
    were measured on and the members' pairwise agreement."""
    from familial.data.provenance import check_family_shards
    from familial.data.shards import TokenShards
    from familial.eval.perplexity import evaluate_held_out

    shards = TokenShards(args.data)
    check_family_shards(args.family, shards)
    held_out = evaluate_held_out(model, shards, seq_len, args.max_tokens or None, args.batch_size)
    for quality in held_out.summary(args.bootstrap, args.seed):
        members[quality["exit"]].update(quality)
    return {"data": {"path": str(args.data), "seq_len": seq_len,
                     "windows": int(held_out.counts.shape[0]), "tokens": int(held_out.counts.sum()),
                     "resamples": args.bootstrap, "seed": args.seed, "level": 0.95},
            "agreement_matrix": {"exits": held_out.exits, "names": held_out.names,
                                 "rates": held_out.pairwise.tolist()}}


def _tasks(args: argparse.Namespace, model, members: dict) -> None:
    """Each member's scores on each --tasks file, into `members`."""
    from familial.eval.tasks import evaluate_task, load_tokenizer, read_task

    tokenizer = load_tokenizer(args.family)
    for file in args.tasks:
        task = read_task(file)
        scores = evaluate_task(model, tokenizer, task, list(model.config.exits), args.batch_size,
                               args.max_new_tokens)
        for e, metrics in scores.items():
            members[e].setdefault("tasks", {})[task.name] = metrics


def _latency(args: argparse.Namespace, model, members: dict) -> dict:
    """Each member's prefill and decode times (into `members`); -> how they were measured."""
    config = model.config
    prompt = args.prompt_tokens or min(128, config.max_position_embeddings - args.decode_tokens)
    for e, member in members.items():
        member.update(measure_latency(model, e, prompt, args.decode_tokens, args.runs))
    return {"prompt_tokens": prompt, "decode_tokens": args.decode_tokens, "runs": args.runs,
            "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads()}


def format_table(result: dict) -> str:
    lines = [f"{'member':<12} {'exit':>4} {'params':>8} {'FLOPs/tok':>9} {'loss':>8} "
             f"{'ppl':>9} {'ppl 95% CI':>19} {'agree':>6} {'prefill':>9} {'decode':>10}"]
    for m in result["members"]:
        ci = m.get("perplexity_ci")
        lines.append(
            f"{m['name']:<12} {m['exit']:>4} {format_count(m['parameters']):>8} "
            f"{format_count(m['flops_per_token']):>9} "
            f"{_fmt(m.get('loss'), '8.4f')} {_fmt(m.get('perplexity'), '9.3f')} "
            f"{(f'[{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '-'):>19} {_fmt(m.get('agreement'), '6.3f')} "
            f"{_fmt(m.get('prefill_ms'), '7.2f')}ms {_fmt(m.get('decode_ms_per_token'), '6.3f')}ms/t")
        for task, metrics in m.get("tasks", {}).items():
            scores = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "n")
            lines.append(f"{'':<12} {task}: {scores} (n={metrics['n']})")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if value is not None else "-".rjust(width)


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="family checkpoint directory")
    parser.add_argument("--eval", dest="eval_json", help="JSON written by `familial eval --json`")
    parser.add_argument("--run", help="training run directory (reads its metrics.jsonl)")
    parser.add_argument("--baselines", help="JSON list of separately trained models: "
                        '[{"name", "loss", "parameters" and/or "flops_per_token"}]')
    parser.add_argument("--out", required=True, help="report directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


@arguments(_report_arguments)
def report(args: argparse.Namespace) -> int:
    from familial.eval.report import build_report

    path = build_report(args.family, args.out, args.eval_json, args.run, args.baselines,
                        args.overwrite)
    print(f"wrote {path}")
    return 0


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="family checkpoint directory")
    parser.add_argument("--train", required=True, help="token shards the family trained on "
                                                        "(the baselines are fitted to them)")
    parser.add_argument("--held-out", required=True, help="token shards never trained on")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per evaluation window")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N held-out tokens")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="also write the report as JSON to this file")


@arguments(_compare_arguments)
def compare(args: argparse.Namespace) -> int:
    from familial.data.provenance import check_family_shards
    from familial.data.shards import TokenShards
    from familial.eval.evidence import PairedBootstrap, collect, family_report, format_report

    if args.threads:
        torch.set_num_threads(args.threads)
    train, held_out = TokenShards(args.train), TokenShards(args.held_out)
    check_family_shards(args.family, train, held_out)
    model = load_family(args.family).eval()
    sums = collect(model, train, held_out, args.seq_len, args.max_tokens)
    names = [model.config.member_name(e) for e in model.config.exits]
    layers = {name: model.config.member_layers(e) for name, e in zip(names, model.config.exits)}
    evidence = family_report(sums, names, PairedBootstrap(sums.counts, args.resamples))
    print(f"held-out: {evidence['tokens']:,} tokens; loss in nats per token; [95% intervals], paired "
          f"bootstrap over {evidence['units']} {evidence['unit']}s")
    print(format_report(evidence, layers))
    if args.json:
        Path(args.json).write_text(json.dumps(evidence, indent=2) + "\n")
    return 0
