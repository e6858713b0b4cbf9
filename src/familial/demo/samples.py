"""Samples from every member for the same prompt and seed, laid out to be compared.

One engine serves all members from the same weights. The terminal gets the samples in
columns when it is wide enough (else one after another); the run directory gets them as
Markdown, one section per prompt.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

from familial.infer.engine import Engine
from familial.infer.sampling import SamplingParams
from familial.model import FamilyModel

MIN_COLUMN = 30


def sample_members(models: dict[str, tuple[FamilyModel, int]], tokenizer, prompt: str,
                   params: SamplingParams) -> dict[str, str]:
    """{label: continuation} for (model, exit) pairs, each from the same prompt and seed."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    engines: dict[int, Engine] = {}
    out = {}
    for label, (model, exit_layer) in models.items():
        engine = engines.setdefault(id(model), Engine(model, tokenizer))
        out[label] = engine.generate([ids], member=exit_layer, params=params)[0].text
    return out


def columns(prompt: str, samples: dict[str, str], width: int | None = None) -> str:
    """The samples side by side, prompt included, each column wrapped to its width."""
    width = width or shutil.get_terminal_size((160, 24)).columns
    column = (width - 3 * (len(samples) - 1)) // len(samples)
    if column < MIN_COLUMN:
        return "\n".join(f"--- {label} ---\n{prompt}{text}" for label, text in samples.items())
    cells = []
    for label, text in samples.items():
        lines = [label.center(column, "-")]
        for line in (prompt + text).expandtabs(4).split("\n"):
            lines.extend(textwrap.wrap(line, column, drop_whitespace=False) or [""])
        cells.append(lines)
    height = max(len(cell) for cell in cells)
    rows = [" | ".join((cell[i] if i < len(cell) else "").ljust(column) for cell in cells).rstrip()
            for i in range(height)]
    return "\n".join(rows)


def write_markdown(path: Path, settings: str, results: list[tuple[str, dict[str, str]]]) -> Path:
    parts = [f"# Samples from every member\n\n{settings}\n"]
    for prompt, samples in results:
        parts.append(f"\n## Prompt {prompt!r}\n")
        for label, text in samples.items():
            parts.append(f"\n### {label}\n\n````\n{prompt}{text}\n````\n")
    path.write_text("".join(parts))
    return path
