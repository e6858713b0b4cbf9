"""Keep freed memory in the process, so loops that free and reallocate large buffers every step
do not fault them back in from the kernel each time.

glibc serves a block above its mmap threshold with a fresh mapping and unmaps it on free; below
it, it trims the top of the heap back to the kernel once more than its trim threshold is free.
A step that builds (tokens, vocabulary) logits, softmaxes and gradients allocates tens of MB per
tensor, and every such allocation came back as zeroed pages to fault in: training the exits of
SmolLM2 (vocabulary 49,152) spent 45% of its CPU time in the kernel doing so. A serving engine's
step does the same with its activations (a 512-token step at hidden 512: 5-7% of the step, one
thread). Raising both thresholds makes glibc reuse the freed blocks; both are set together,
since setting either turns off glibc's own raising of the mmap threshold (the trim threshold
alone made that step about 25% slower). Blocks above `MMAP_THRESHOLD_MAX` (glibc's ceiling for
the setting) are still mapped per allocation, so callers keep their largest buffers below it
(`exit_cache.head_chunk_rows`).
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (malloc.h) and glibc's upper limit for the mmap threshold on 64-bit.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library is not
    glibc (macOS, musl) or refuses, which leaves the allocator as it was."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
