"""`familial ...`: a thin dispatcher; each subcommand lives in the module that does the work.

A command module provides `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only when their command runs, so `familial info` does not pay for the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from familial.config import ConfigError

COMMANDS = {
    "import": ("familial.commands.family", "import a dense HF Qwen3 or Llama checkpoint, a Ruyi2 release or a GGUF file as a family"),
    "export": ("familial.commands.family", "export members as dense HF Qwen3 or Llama checkpoints, or as GGUF files"),
    "info": ("familial.commands.family", "show a family: exits, members, parameters, memory"),
    "verify": ("familial.commands.family", "check a family's tensors and their sha256 checksums"),
    "data": ("familial.data.cli", "prepare packed token shards from text, JSONL or chat data"),
    "tokenizer": ("familial.data.tokenizer_train", "fit a byte-level BPE tokenizer to text files"),
    "train": ("familial.commands.train", "train every member at once from a TOML config"),
    "exits": ("familial.commands.exits", "train the exits of a frozen trunk from a cache of its states"),
    "plot": ("familial.commands.train", "plot per-exit training curves of a run directory"),
    "demo": ("familial.demo", "train, evaluate and export a small family on the bundled corpus"),
    "expand": ("familial.posttrain.cli", "append zero-initialised blocks to a member's branch"),
    "compress": ("familial.posttrain.cli", "SVD-LLM v2 decomposition of a member's matrices"),
    "grpo": ("familial.posttrain.cli", "GRPO reinforcement learning of one member"),
    "generate": ("familial.infer.cli", "generate text with a member, auto exit or speculation"),
    "calibrate": ("familial.infer.cli", "pick early-exit thresholds for a target agreement"),
    "serve": ("familial.serve.cli", "OpenAI-compatible server for every member of a family"),
    "eval": ("familial.eval.cli", "per-member loss, perplexity and task accuracy"),
    "compare": ("familial.eval.evidence", "members against n-gram baselines and each other, paired intervals"),
    "report": ("familial.eval.cli", "Markdown report with the family's quality/cost charts"),
}

# Optional dependencies and the extras of pyproject.toml that install them (the usual one
# first); a command that needs one names the extra when it is missing.
EXTRAS = {"transformers": ("hf",), "tensorboard": ("train",), "matplotlib": ("train", "eval"),
          "jinja2": ("train", "serve"), "fastapi": ("serve",), "uvicorn": ("serve",),
          "lm_eval": ("eval",), "gguf": ("gguf",)}
COMMAND_EXTRAS = {"serve": "serve", "eval": "eval", "report": "eval"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="familial", description="Train once, deploy many: familial LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command '{argv[0]}'")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    try:
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser(prog=f"familial {name}", description=COMMANDS[name][1])
        module.add_arguments(name, parser)
        args = parser.parse_args(argv[1:])
        args.command = name
        return int(module.run(args) or 0)
    except (ConfigError, ValueError, OSError, ImportError) as error:
        message = describe_error(name, error)
        if message is None:
            raise
        print(f"familial {name}: error: {message}", file=sys.stderr)
        return 2


def describe_error(command: str, error: Exception) -> str | None:
    """One line for an error a user can act on; None for a bug (a traceback helps more)."""
    if isinstance(error, ImportError):
        module = (error.name or "").split(".")[0]
        extras = EXTRAS.get(module)
        if extras is None:
            return None if error.name else str(error)
        extra = COMMAND_EXTRAS.get(command)
        return (f"{command} needs {module}, which is not installed: run "
                f"pip install 'familial[{extra if extra in extras else extras[0]}]'")
    if isinstance(error, OSError) and error.filename is not None:
        where = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
        return f"{where}: {error.strerror or error}"
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
