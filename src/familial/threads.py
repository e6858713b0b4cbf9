"""How many CPU threads a command should use, so that a busy machine does not make it crawl.

torch's default is one intra-op thread per core. On a machine whose cores are busy with
other work, every parallel op then waits for its slowest thread, which is waiting for a
core: a step can take several times longer than with one thread. So:

- a small model gets 1 thread: its ops are too small to split profitably;
- otherwise, one thread per core that other processes leave idle, measured over half a
  second from /proc/stat (the load average lags by a minute), at least 1.

Serving (`serving_threads`) decides by width alone and takes every core: a server runs for
hours, so a load sample at its start says little, and a decode step's products at hidden 512
and above split well over threads, while below that they are too small to split.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from familial.text import counted

# hidden_size x layers at or below which ops are dispatch-bound.
SMALL_MODEL = 16384
# hidden_size from which a serving engine's products split profitably over threads.
SPLIT_WIDTH = 512


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def busy_cores(seconds: float = 0.5) -> float | None:
    """Cores' worth of work other processes did over the next `seconds` (Linux), else None."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]      # all time; idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def pick_threads(hidden_size: int | None = None, layers: int | None = None) -> tuple[int, str]:
    """(threads, why) for a compute command on this machine right now."""
    cores = available_cores()
    if hidden_size is not None and layers is not None and hidden_size * layers <= SMALL_MODEL:
        return 1, f"a small model (hidden {hidden_size} x {counted(layers, 'layer')}): ops too small to split"
    busy = busy_cores()
    if busy is not None:
        why = f"{cores} core(s), other processes busy on {busy:.1f}"
    else:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
        why = f"{cores} core(s), load average {busy:.1f}"
    return max(1, min(cores, round(cores - busy))), why


def serving_threads(hidden_size: int) -> tuple[int, str]:
    """(threads, why) for a serving engine's process (see the module docstring)."""
    if hidden_size < SPLIT_WIDTH:
        return 1, f"hidden {hidden_size} < {SPLIT_WIDTH}: its products are too small to split"
    cores = available_cores()
    return cores, f"hidden {hidden_size}: one per core ({cores})"
