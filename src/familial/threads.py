"""How many CPU threads a command should use, so that a busy machine does not make it crawl.

torch's default is one intra-op thread per core. On a machine whose cores are busy with
other work, every parallel op then waits for its slowest thread, which is waiting for a
core: a step can take several times longer than with one thread (measured on a shared
2-core machine: the demo went from 3 minutes to over 4 hours). So:

- a small model gets 1 thread: its ops are too small to split profitably (the same rule as
  serving, see `familial.infer.engine.suggested_threads`);
- otherwise, the cores this process may run on minus the load already on them (the
  1-minute load average), at least 1.
"""

from __future__ import annotations

import math
import os

# hidden_size x layers at or below which ops are dispatch-bound (as in serving).
SMALL_MODEL = 16384


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pick_threads(hidden_size: int | None = None, layers: int | None = None) -> tuple[int, str]:
    """(threads, why) for a compute command on this machine right now."""
    cores = available_cores()
    if hidden_size is not None and layers is not None and hidden_size * layers <= SMALL_MODEL:
        return 1, f"a small model (hidden {hidden_size} x {layers} layers): ops too small to split"
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    idle = max(1, min(cores, math.floor(cores - load + 0.5)))
    return idle, f"{cores} core(s), load average {load:.1f}"
