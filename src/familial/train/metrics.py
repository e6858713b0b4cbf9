"""Per-step metrics: one JSON object per line in RUN_DIR/metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from familial import checks
from familial.train.losses import ExitSums

METRICS_NAME = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the last write was cut short by a crash
                break
            raise ValueError(f"{path}: line {number} is not a JSON record") from None
    return records


def exit_metrics(means: ExitSums[dict[int, float]], lambdas: dict[int, float], distill: dict[int, float],
                 name: Callable[[int], str]) -> dict[str, float]:
    """A step record's per-exit fields, keyed by member name: each loss term's mean and its weight."""
    record: dict[str, float] = {}
    for e, value in means.ce.items():
        record[f"loss/{name(e)}"] = value
    for e, value in lambdas.items():
        record[f"lambda/{name(e)}"] = value
    for e, value in means.kd.items():
        record[f"kd/{name(e)}"] = value
        record[f"mu/{name(e)}"] = distill[e]
    return record


class MetricsWriter:
    """Appends step records; on resume, records past the resumed step are dropped first."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            temp = self.path.with_suffix(".jsonl.tmp")
            temp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            temp.replace(self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.handle = open(self.path, "a")
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.board = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        # JSON has no NaN/inf: a skipped step's non-finite values are written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self.handle.write(json.dumps(clean) + "\n")
        self.handle.flush()
        if self.board is not None:
            step = record["step"]
            for key, value in clean.items():
                if key != "step" and checks.is_number(value):
                    self.board.add_scalar(key.replace(".", "/"), value, step)

    def close(self) -> None:
        self.handle.close()
        if self.board is not None:
            self.board.close()
