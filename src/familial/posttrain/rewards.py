"""Verifiable rewards for GRPO, and the toy arithmetic task the recipe trains on.

A reward is any callable `reward(prompt, completion, answer) -> float`. `load_reward` turns
a config string into one: "arithmetic" (exact numeric answer, below), "math_verify" (Hugging
Face's math-verify when installed, else "arithmetic"), or "package.module:function".
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable
from fractions import Fraction

from familial.config import ConfigError

Reward = Callable[[str, str, str], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last \\boxed{...}, else what follows the last
    '####' (GSM8K style), else the last number in the text."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def parse_number(text: str | None) -> Fraction | None:
    """'1,234', '-3.5', '3/4' -> an exact Fraction; anything else -> None."""
    if text is None:
        return None
    text = text.strip().rstrip(".").replace(",", "")
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def arithmetic_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals the reference number exactly, else 0.0."""
    expected = parse_number(answer)
    if expected is None:
        raise ConfigError(f"arithmetic reward: reference answer {answer!r} is not a number")
    return 1.0 if parse_number(extract_answer(completion)) == expected else 0.0


def math_verify_reward(prompt: str, completion: str, answer: str) -> float:
    """Symbolic equivalence by math-verify (LaTeX, sets, intervals...) when it is installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return arithmetic_reward(prompt, completion, answer)
    return 1.0 if verify(parse(answer), parse(completion)) else 0.0


BUILTIN: dict[str, Reward] = {"arithmetic": arithmetic_reward, "math_verify": math_verify_reward}


def load_reward(spec: str) -> Reward:
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"reward = {spec!r}: expected {', '.join(BUILTIN)} or 'module:function'")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"reward = {spec!r}: cannot import it ({error})") from None
    if not callable(function):
        raise ConfigError(f"reward = {spec!r}: is not callable")
    return function


def sum_problems(max_operand: int, template: str = "{a}+{b}=") -> list[tuple[str, str]]:
    """Every 'a+b=' prompt with 0 <= a, b <= max_operand and its answer."""
    return [(template.format(a=a, b=b), str(a + b))
            for a in range(max_operand + 1) for b in range(max_operand + 1)]


def split_problems(problems: list[tuple[str, str]], held_out: float,
                   seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A seeded shuffle split into (train, held-out)."""
    shuffled = list(problems)
    random.Random(seed).shuffle(shuffled)
    count = int(round(held_out * len(shuffled)))
    return shuffled[count:], shuffled[:count]
