"""Typed field checks that every loader shares, each failing with one line naming the value.

Each check takes `name`, the words that say which value this is ("top_k", "sampling parameter
'top_k'", "tasks.jsonl:3: field 'answer'"), and the value, returns the value when it passes,
and otherwise raises `error` (the caller's own error type) with the message
`{name} = {value!r}: expected {expected}`. `expected` has a default per check, and callers
whose readers know a more telling wording ("the index of the right choice, 0..3") pass it.
A config names its fields as `field(where, name)` does ("f.json: field 'steps'"); a rule
between fields (heads divide the width) fails through `require` with its own wording.

A bool is never a number here, though Python counts it as an int: `true` where a count or a
rate belongs is a mistake to name, not the number 1. NaN and infinities are not numbers
either, so every check that passes a float passes a finite one.

This module imports nothing from the package, so any config module can use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def field(where: str, name: str) -> str:
    """How a config names one of its fields: `where` is the file, or the config's kind."""
    return f"{where}: field '{name}'"


def require(ok: bool, name: str, value: Any, why: str, *, error: type[Exception] = ValueError) -> None:
    """A rule a check of one value cannot say (`why` reads "must divide hidden_size (64)")."""
    if not ok:
        raise error(f"{name} = {value!r}: {why}")


def _fail(error: type[Exception], name: str, value: Any, expected: str) -> Exception:
    return error(f"{name} = {value!r}: expected {expected}")


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that converts to a finite float (10**400 does not), never a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def integer(name: str, value: Any, expected: str = "an integer", *, minimum: int | None = None,
            maximum: int | None = None, error: type[Exception] = ValueError) -> int:
    """An int, not a bool, within [minimum, maximum] where they are given."""
    if (not is_integer(value)
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        raise _fail(error, name, value, expected)
    return value


def positive_int(name: str, value: Any, expected: str = "a positive integer", *,
                 error: type[Exception] = ValueError) -> int:
    return integer(name, value, expected, minimum=1, error=error)


def non_negative_int(name: str, value: Any, expected: str = "0 or more", *,
                     error: type[Exception] = ValueError) -> int:
    return integer(name, value, expected, minimum=0, error=error)


def integers(name: str, value: Any, expected: str = "a non-empty list of integers", *,
             minimum: int | None = None, error: type[Exception] = ValueError) -> list[int]:
    """A non-empty list of ints, each at least `minimum` where it is given."""
    if not isinstance(value, list) or not value or not all(
            is_integer(v) and (minimum is None or v >= minimum) for v in value):
        raise _fail(error, name, value, expected)
    return value


def finite_number(name: str, value: Any, expected: str = "a number", *, minimum: float | None = None,
                  maximum: float | None = None, error: type[Exception] = ValueError) -> float:
    """An int or a finite float, not a bool, within [minimum, maximum] where they are given."""
    if (not is_number(value)
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        raise _fail(error, name, value, expected)
    return value


def positive_number(name: str, value: Any, expected: str = "a positive number", *,
                    error: type[Exception] = ValueError) -> float:
    if not finite_number(name, value, expected, error=error) > 0:
        raise _fail(error, name, value, expected)
    return value


def in_range(name: str, value: Any, low: float, high: float, expected: str | None = None, *,
             open_low: bool = False, open_high: bool = False, error: type[Exception] = ValueError) -> float:
    """A number between `low` and `high`, each bound included unless it is open."""
    expected = expected or f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    finite_number(name, value, expected, minimum=low, maximum=high, error=error)
    if (open_low and value == low) or (open_high and value == high):
        raise _fail(error, name, value, expected)
    return value


def probability(name: str, value: Any, expected: str = "a number in (0, 1]", *,
                error: type[Exception] = ValueError) -> float:
    """A number in (0, 1]: a probability mass to keep, where keeping nothing means nothing."""
    return in_range(name, value, 0, 1, expected, open_low=True, error=error)


def boolean(name: str, value: Any, expected: str = "true or false", *,
            error: type[Exception] = ValueError) -> bool:
    if not isinstance(value, bool):
        raise _fail(error, name, value, expected)
    return value


def one_of(name: str, value: Any, choices: Iterable[Any], expected: str | None = None, *,
           error: type[Exception] = ValueError) -> Any:
    choices = list(choices)
    if value not in choices:
        raise _fail(error, name, value, expected or "one of " + ", ".join(repr(c) for c in choices))
    return value
