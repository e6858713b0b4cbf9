"""Wording shared by the command line's messages."""

from __future__ import annotations


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """"1 layer", "2 layers", "0 exits": a count with its noun in the right number."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"
