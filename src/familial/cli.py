"""`familial ...`: every command, in one table, and the dispatcher that runs it.

`COMMANDS` maps each command name to the one function that does it ("module:function", in
`familial.commands`) and its help line; a command with actions (`familial data prepare`) maps
each action to its function. A function's arguments are declared next to it
(`familial.commands.arguments`). Modules are imported only when their command runs, so
`familial info` does not pay for the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import NamedTuple

from familial.config import ConfigError


class Command(NamedTuple):
    function: str   # "module:function", imported when the command runs
    help: str


class Actions(NamedTuple):
    help: str
    actions: dict[str, Command]


COMMANDS: dict[str, Command | Actions] = {
    "import": Command("familial.commands.family:import_family",
                      "import a dense HF Qwen3 or Llama checkpoint, a Ruyi2 release or a GGUF file as a family"),
    "export": Command("familial.commands.family:export",
                      "export members as dense HF Qwen3 or Llama checkpoints, or as GGUF files"),
    "info": Command("familial.commands.family:info", "show a family: exits, members, parameters, memory"),
    "verify": Command("familial.commands.family:verify", "check a family's tensors and their sha256 checksums"),
    "data": Actions("prepare packed token shards from text, JSONL or chat data", {
        "prepare": Command("familial.commands.data:prepare", "tokenise inputs into token shards"),
        "merge": Command("familial.commands.data:merge",
                         "join shard directories (the parts of a `prepare --shard` run) into one"),
        "info": Command("familial.commands.data:info",
                        "show a shard directory's (or Megatron dataset's) manifest and counts"),
        "demo": Command("familial.commands.data:demo", "write the demo corpus's train and held-out shards"),
    }),
    "tokenizer": Actions("fit a byte-level BPE tokenizer to text files", {
        "train": Command("familial.commands.data:train_tokenizer", "fit a byte-level BPE tokenizer to text files"),
    }),
    "train": Command("familial.commands.train:train", "train every member at once from a TOML config"),
    "exits": Actions("train the exits of a frozen trunk from a cache of its states", {
        "cache": Command("familial.commands.exits:cache", "run the frozen trunk once and cache its states"),
        "train": Command("familial.commands.exits:train", "train the branches from the cache"),
        "eval": Command("familial.commands.exits:evaluate", "held-out figures per exit"),
    }),
    "plot": Command("familial.commands.train:plot", "plot per-exit training curves of a run directory"),
    "demo": Command("familial.commands.demo:demo", "train, evaluate and export a small family on the bundled corpus"),
    "expand": Command("familial.commands.posttrain:expand", "append zero-initialised blocks to a member's branch"),
    "compress": Command("familial.commands.posttrain:compress", "SVD-LLM v2 decomposition of a member's matrices"),
    "grpo": Command("familial.commands.posttrain:grpo", "GRPO reinforcement learning of one member"),
    "generate": Command("familial.commands.infer:generate", "generate text with a member, auto exit or speculation"),
    "calibrate": Command("familial.commands.infer:calibrate", "pick early-exit thresholds for a target agreement"),
    "serve": Command("familial.commands.serve:serve", "OpenAI-compatible server for every member of a family"),
    "eval": Command("familial.commands.eval:evaluate", "per-member loss, perplexity and task accuracy"),
    "compare": Command("familial.commands.eval:compare",
                       "members against n-gram baselines and each other, paired intervals"),
    "report": Command("familial.commands.eval:report", "Markdown report with the family's quality/cost charts"),
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
    for name, entry in COMMANDS.items():
        sub.add_parser(name, help=entry.help, add_help=False)
    return parser


def resolve(command: Command) -> Callable[[argparse.Namespace], int]:
    """The command's function, its module imported now."""
    module, _, function = command.function.partition(":")
    return getattr(importlib.import_module(module), function)


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command (with a subparser per action), its functions imported."""
    entry = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"familial {name}", description=entry.help)
    if isinstance(entry, Command):
        resolve(entry).add_arguments(parser)
        return parser
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, command in entry.actions.items():
        resolve(command).add_arguments(actions.add_parser(action, help=command.help))
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
        args = command_parser(name).parse_args(argv[1:])
        entry = COMMANDS[name]
        command = entry if isinstance(entry, Command) else entry.actions[args.action]
        return int(resolve(command)(args) or 0)
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
