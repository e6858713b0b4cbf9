"""Hold a model's forward passes at a point the test chooses.

Tests of queues and cancellation need a request that is provably still running when the
next thing happens; a request that is merely "long" finishes first on a fast enough
machine. A gate on the embedding (every forward pass of the runtime starts there) lets the
first `allow` passes through and holds the next one until the test releases it.
"""

from __future__ import annotations

import threading

from torch import nn

# Only a hang fails on this: a held pass is reached within a few forward passes.
HANG_S = 300


class ForwardGate:
    def __init__(self, module: nn.Module, allow: int) -> None:
        self.allow, self.calls = allow, 0
        self._lock = threading.Lock()
        self._held, self._open = threading.Event(), threading.Event()
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args) -> None:
        with self._lock:
            self.calls += 1
            hold = self.calls > self.allow
        if hold and not self._open.is_set():
            self._held.set()
            self._open.wait()

    def wait_held(self) -> None:
        """Block until a forward pass is waiting at the gate."""
        if not self._held.wait(HANG_S):
            raise AssertionError(f"no forward pass reached the gate in {HANG_S}s ({self.calls} passed)")

    def release(self) -> None:
        self._open.set()

    def remove(self) -> None:
        self._handle.remove()
        self.release()
