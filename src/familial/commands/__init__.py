"""The `familial` commands: one function per command, one module per area.

A command function takes the parsed arguments and returns the exit status. `@arguments(declare)`
attaches the function that declares its argparse arguments, written just above it, so a
command's flags and its code read together. The work itself lives in the library modules
(`familial.serve.app`, `familial.eval.perplexity`, ...); a command validates its arguments,
calls them and prints. `familial.cli.COMMANDS` names every command and its function: a new
command is a function here, its `@arguments`, and one line in that table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

Declare = Callable[[argparse.ArgumentParser], None]


def arguments(declare: Declare):
    """Attach `declare(parser)` to a command function as its `add_arguments`."""
    def attach(command: Callable[[argparse.Namespace], int]):
        command.add_arguments = declare
        return command
    return attach
