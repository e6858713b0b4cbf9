"""Timing shared by the decoding benches: which clock, and contenders run in turns."""

from __future__ import annotations

import time

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def add_clock_argument(parser) -> None:
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: this process's CPU time (steady on a shared machine; with one thread "
                             "it equals wall time on an idle core); wall: elapsed time")


def race(contenders: dict, repeats: int, clock) -> dict[str, tuple[float, object]]:
    """Best seconds of each contender (and its last result), run in turns so that a busy spell
    hits all alike."""
    best = {name: float("inf") for name in contenders}
    results = {}
    for _ in range(repeats):
        for name, fn in contenders.items():
            started = clock()
            results[name] = fn()
            best[name] = min(best[name], clock() - started)
    return {name: (best[name], results[name]) for name in contenders}
