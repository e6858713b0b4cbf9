"""`familial import | export | info | verify`: moving families in and out of the HF world."""

from __future__ import annotations

import argparse
import json

from familial import checkpoint_io
from familial.commands import arguments
from familial.config import ConfigError, FamilyConfig
from familial.summary import format_summary, summarize
from familial.text import counted


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got '{text}'") from None


def _aliases(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        name, _, exit_layer = part.partition("=")
        name = name.strip()
        if not exit_layer.strip().lstrip("-").isdecimal():
            raise argparse.ArgumentTypeError(f"expected name=exit pairs like device=2,cloud=39, got '{part}'")
        if name in out:
            raise argparse.ArgumentTypeError(f"alias '{name}' is given twice ({name}={out[name]} and "
                                             f"{name}={int(exit_layer)}); give each member one name")
        out[name] = int(exit_layer)
    return out


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="dense HF Qwen3 or Llama directory, a Ruyi2 release directory, or a llama.cpp .gguf file (llama or qwen3)")
    parser.add_argument("output", help="family checkpoint directory to write")
    parser.add_argument("--exits", type=_int_list,
                        help="0-based exit layers, the last being the last layer (e.g. 1,3,5)")
    parser.add_argument("--branch-layers", type=int, default=1, help="decoder layers per branch")
    parser.add_argument("--shared-head", action="store_true", help="one LM head for all exits")
    parser.add_argument("--names", type=_aliases, default={},
                        help="member aliases, e.g. device=2,edge=21,cloud=39")
    parser.add_argument("--overwrite", action="store_true")


@arguments(_import_arguments)
def import_family(args: argparse.Namespace) -> int:
    config = checkpoint_io.import_checkpoint(
        args.source, args.output, exits=args.exits, branch_layers=args.branch_layers,
        shared_head=args.shared_head, member_names=args.names, overwrite=args.overwrite)
    print(f"wrote family with exits {config.exits} to {args.output}")
    print(format_summary(summarize(config)))
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="family checkpoint directory")
    parser.add_argument("output", help="output directory (with --all: one subdirectory per member); "
                                       "with --format gguf, the .gguf file (with --all: a directory "
                                       "of MEMBER.gguf files)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--member", help="exit layer index or alias")
    which.add_argument("--all", action="store_true", help="export every member")
    parser.add_argument("--format", choices=["hf", "gguf"], default="hf",
                        help="hf: dense Hugging Face checkpoint (default); gguf: a llama.cpp file")
    parser.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0"],
                        help="GGUF weight type (default f32; norms stay f32)")
    parser.add_argument("--overwrite", action="store_true")


@arguments(_export_arguments)
def export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        paths = _export_gguf(args)
    elif args.type is not None:
        raise ConfigError("--type chooses a GGUF weight type: use it with --format gguf")
    elif args.all:
        paths = checkpoint_io.export_all(args.family, args.output, args.overwrite)
    else:
        paths = [checkpoint_io.export_member(args.family, args.output, args.member, args.overwrite)]
    for path in paths:
        print(f"wrote {path}")
    return 0


def _export_gguf(args: argparse.Namespace) -> list:
    from familial.gguf.write import export_all_gguf, export_member_gguf

    kind = args.type or "f32"
    if args.all:
        return export_all_gguf(args.family, args.output, kind, args.overwrite)
    return [export_member_gguf(args.family, args.output, args.member, kind, args.overwrite)]


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="family checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@arguments(_info_arguments)
def info(args: argparse.Namespace) -> int:
    config = FamilyConfig.load(args.family)
    summary = summarize(config)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(f"family {args.family}: exits {config.exits}, "
              f"{counted(config.num_hidden_layers, 'trunk layer')}, hidden {config.hidden_size}")
        print(format_summary(summary))
    return 0


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="family checkpoint directory")


@arguments(_verify_arguments)
def verify(args: argparse.Namespace) -> int:
    config, hashed = checkpoint_io.verify_family(args.family)
    tensors = len(checkpoint_io.family_parameter_names(config))
    print(f"{args.family}: {tensors} tensors match family.json (names, shapes, dtypes)")
    if hashed is None:
        print(f"{args.family}: nothing to hash: family.json lists no checksums (written before "
              f"familial stored them), so only names, shapes and dtypes were checked")
        return 0
    tensors = [name for name in hashed if name != "tokenizer.json"]
    print(f"{args.family}: sha256 of {len(tensors)} tensor file(s) match family.json "
          f"({', '.join(tensors)})")
    if "tokenizer.json" in hashed:
        print(f"{args.family}: tokenizer.json is the one family.json records (sha256), and "
              f"fits the family's vocabulary")
    return 0
