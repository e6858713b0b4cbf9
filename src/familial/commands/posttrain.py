"""`familial expand | compress | grpo`: post-training of one member, checkpoint to checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from familial.commands import arguments
from familial.checkpoint_io import load_family, save_family
from familial.staging import check_output_directory
from familial.summary import format_count
from familial.text import counted


def _patterns(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _member_arguments(parser: argparse.ArgumentParser) -> None:
    """What expand and compress share: one member of one family, written as another family."""
    parser.add_argument("family", help="family checkpoint directory to read")
    parser.add_argument("output", help="family checkpoint directory to write")
    parser.add_argument("--member", required=True, help="exit layer index or alias")
    parser.add_argument("--overwrite", action="store_true")


def _load_member(args: argparse.Namespace):
    """-> (the family, the member's parameter count), having refused an unusable output first:
    before the work, not after it."""
    check_output_directory(Path(args.output), args.overwrite)
    model = load_family(args.family)
    return model, sum(p.numel() for p in model.member(args.member).parameters())


def _save_member(args: argparse.Namespace, model, before: int) -> None:
    after = sum(p.numel() for p in model.member(args.member).parameters())
    save_family(model, args.output, tokenizer_source=args.family, overwrite=args.overwrite)
    print(f"member {args.member}: {format_count(before)} -> {format_count(after)} parameters; "
          f"wrote {args.output}")


def _expand_arguments(parser: argparse.ArgumentParser) -> None:
    _member_arguments(parser)
    parser.add_argument("--blocks", type=int, required=True, help="decoder blocks to append")
    parser.add_argument("--init", choices=("random", "clone"), default="random",
                        help="q/k/v/gate/up: Gaussian (paper) or copies of the last branch layer")
    parser.add_argument("--std", type=float, help="Gaussian std (default: initializer_range)")
    parser.add_argument("--seed", type=int, default=0)


@arguments(_expand_arguments)
def expand(args: argparse.Namespace) -> int:
    from familial.posttrain.expand import expand_member

    model, before = _load_member(args)
    names = expand_member(model, args.member, args.blocks, args.init, args.std, args.seed)
    print(f"appended {counted(len(names), 'block')} to member {args.member}: {', '.join(names)}")
    _save_member(args, model, before)
    return 0


def _compress_arguments(parser: argparse.ArgumentParser) -> None:
    _member_arguments(parser)
    parser.add_argument("--ratio", type=float, required=True,
                        help="fraction of the target matrices' parameters to remove, e.g. 0.4")
    parser.add_argument("--calibration", required=True,
                        help="token shard directory, or a .pt/.npy file of (samples, length) ids")
    parser.add_argument("--samples", type=int, default=256, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument("--targets", type=_patterns,
                        help="comma-separated glob patterns of linear layers (default: the "
                             "expanded blocks and the member's head)")
    parser.add_argument("--method", choices=("eigen", "cholesky", "svd"), default="eigen",
                        help="eigen: inversion-free whitening (default); cholesky: classic "
                             "whitening, needs a non-singular covariance or --damping; svd: plain")
    parser.add_argument("--damping", type=float, default=0.0,
                        help="add this fraction of the covariance's mean diagonal to it")


@arguments(_compress_arguments)
def compress(args: argparse.Namespace) -> int:
    from familial.posttrain.compress import calibration_batches, compress_member

    model, before = _load_member(args)
    batches = calibration_batches(args.calibration, args.samples, args.seq_len)
    plans = compress_member(model, args.member, batches, args.ratio, args.targets,
                            args.method, args.damping)
    for plan in plans:
        rank = "dense" if plan.rank is None else f"rank {plan.rank}"
        print(f"{plan.name:<40} {plan.rows}x{plan.cols} {rank:>10} ratio {plan.ratio:.3f} "
              f"rel. error {plan.relative_error:.4f}")
    dense = sum(p.dense_parameters for p in plans)
    kept = sum(p.parameters for p in plans)
    print(json.dumps({"target_parameters": dense, "compressed_parameters": kept,
                      "removed_fraction": round(1 - kept / dense, 4)}))
    _save_member(args, model, before)
    return 0


def _grpo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="GRPO TOML config (see docs/recipe.md)")
    parser.add_argument("--steps", type=int, help="override the config's steps")


@arguments(_grpo_arguments)
def grpo(args: argparse.Namespace) -> int:
    from familial.posttrain.grpo import load_config, train

    config = load_config(args.config)
    if args.steps is not None:
        config.steps = args.steps
    train(config)
    return 0
