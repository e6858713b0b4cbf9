"""Typed field checks that every loader shares, each failing with one line naming the value.

Each check takes `name`, the words that say which value this is ("top_k", "sampling parameter
'top_k'", "tasks.jsonl:3: field 'answer'"), and the value, returns the value when it passes,
and otherwise raises `error` (the caller's own error type) with the message
`{name} = {value!r}: expected {expected}`. `expected` has a default per check, and callers
whose readers know a more telling wording ("the index of the right choice, 0..3") pass it.

A bool is never a number here, though Python counts it as an int: `true` where a count or a
rate belongs is a mistake to name, not the number 1. NaN and infinities are not numbers
either, so every check that passes a float passes a finite one.

This module imports nothing from the package, so any config module can use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def _fail(error: type[Exception], name: str, value: Any, expected: str) -> Exception:
    return error(f"{name} = {value!r}: expected {expected}")


def integer(name: str, value: Any, expected: str = "an integer", *, minimum: int | None = None,
            maximum: int | None = None, error: type[Exception] = ValueError) -> int:
    """An int, not a bool, within [minimum, maximum] where they are given."""
    if (isinstance(value, bool) or not isinstance(value, int)
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        raise _fail(error, name, value, expected)
    return value


def positive_int(name: str, value: Any, expected: str = "a positive integer", *,
                 error: type[Exception] = ValueError) -> int:
    return integer(name, value, expected, minimum=1, error=error)


def finite_number(name: str, value: Any, expected: str = "a number", *, minimum: float | None = None,
                  maximum: float | None = None, error: type[Exception] = ValueError) -> float:
    """An int or a finite float, not a bool, within [minimum, maximum] where they are given."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        raise _fail(error, name, value, expected)
    return value


def positive_number(name: str, value: Any, expected: str = "a positive number", *,
                    error: type[Exception] = ValueError) -> float:
    if not finite_number(name, value, expected, error=error) > 0:
        raise _fail(error, name, value, expected)
    return value


def probability(name: str, value: Any, expected: str = "a number in (0, 1]", *,
                error: type[Exception] = ValueError) -> float:
    """A number in (0, 1]: a probability mass to keep, where keeping nothing means nothing."""
    if not 0 < finite_number(name, value, expected, maximum=1, error=error):
        raise _fail(error, name, value, expected)
    return value


def one_of(name: str, value: Any, choices: Iterable[Any], expected: str | None = None, *,
           error: type[Exception] = ValueError) -> Any:
    choices = list(choices)
    if value not in choices:
        raise _fail(error, name, value, expected or "one of " + ", ".join(repr(c) for c in choices))
    return value
