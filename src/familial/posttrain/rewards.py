"""Rewards for GRPO, and the toy arithmetic task the recipe trains on.

The extension point: a reward is any callable `reward(prompt, completion, answer) -> float`
(completion: the decoded text without its stop token; answer: the problem's reference). A
config names one reward or a weighted list of them (`RewardSpec`); the step's reward is the
weighted sum, and each one's mean is logged on its own (`reward/<name>`). Built in:

- "arithmetic": verifiable answer, 1.0 when the final number equals the reference exactly;
- "math_verify": symbolic equivalence by Hugging Face's math-verify when installed;
- "format": 1.0 when the whole completion matches the regular expression `pattern`;
- "length": 1.0 up to `target` characters, falling linearly to 0.0 at twice that;
- "package.module:function" or "package.module.function": your own callable.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class RewardSpec:
    # a built-in name ("arithmetic", "math_verify", "format", "length") or a callable's path.
    name: str
    # its share of the step's reward (the sum of weight x reward over the list).
    weight: float = 1.0
    # "format": the regular expression the whole completion (stripped) must match.
    pattern: str | None = None
    # "length": completions up to this many characters score 1.0.
    target: int | None = None


def format_reward(pattern: str) -> Reward:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as error:
        raise ConfigError(f"format reward: pattern {pattern!r} is not a regular expression ({error})") from None

    def reward(prompt: str, completion: str, answer: str) -> float:
        return 1.0 if compiled.fullmatch(completion.strip()) else 0.0

    return reward


def length_reward(target: int) -> Reward:
    if target < 1:
        raise ConfigError(f"length reward: target = {target}: expected a positive number of characters")

    def reward(prompt: str, completion: str, answer: str) -> float:
        return min(1.0, max(0.0, 2.0 - len(completion) / target))

    return reward


BUILTIN: dict[str, Reward] = {"arithmetic": arithmetic_reward, "math_verify": math_verify_reward}


def load_reward(spec: str | RewardSpec) -> Reward:
    """A reward callable from a name, a dotted path or a RewardSpec (its weight not applied)."""
    if isinstance(spec, RewardSpec):
        if spec.name == "format":
            if spec.pattern is None:
                raise ConfigError("reward 'format' needs 'pattern' (a regular expression)")
            return format_reward(spec.pattern)
        if spec.name == "length":
            if spec.target is None:
                raise ConfigError("reward 'length' needs 'target' (characters)")
            return length_reward(spec.target)
        spec = spec.name
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, _, attribute = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(f"reward = {spec!r}: expected {', '.join(BUILTIN)}, 'format', 'length' or "
                          f"'module:function'")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"reward = {spec!r}: cannot import it ({error})") from None
    if not callable(function):
        raise ConfigError(f"reward = {spec!r}: is not callable")
    return function


class Rewards:
    """A weighted list of rewards: `scores` gives each one's values and their weighted sum."""

    def __init__(self, specs: str | Reward | list[RewardSpec]) -> None:
        if callable(specs):
            specs, functions = [RewardSpec(getattr(specs, "__name__", "reward"))], [specs]
        else:
            specs = [RewardSpec(specs)] if isinstance(specs, str) else list(specs)
            if not specs:
                raise ConfigError("reward: the list is empty (name at least one reward)")
            functions = [load_reward(spec) for spec in specs]
        names = [spec.name.rpartition(":")[2].rpartition(".")[2] for spec in specs]
        # Each reward logs under its own name: a name listed twice gets its position added.
        self.names = [n if names.count(n) == 1 else f"{n}.{i}" for i, n in enumerate(names)]
        self.weights = [spec.weight for spec in specs]
        self.functions = functions

    def scores(self, prompts: list[str], completions: list[str],
               answers: list[str]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per completion, {name: that reward's values})."""
        parts = {name: [float(f(p, c, a)) for p, c, a in zip(prompts, completions, answers)]
                 for name, f in zip(self.names, self.functions)}
        totals = [sum(w * parts[n][i] for n, w in zip(self.names, self.weights))
                  for i in range(len(completions))]
        return totals, parts


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
