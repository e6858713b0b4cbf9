"""Request bodies with many JSON items, measured in a worker process before the server parses them.

`json.loads` is one C call that holds the GIL from start to end, so no thread keeps it off the
event loop: 190,000 keys in 2.5 MB cost ~0.5 s of every other request's time, wherever it
ran. A body whose commas and quotes say it may hold more items than a few milliseconds' parse
is first parsed here, in a worker (json and nothing else: one starts in ~30 ms), which answers
how many items it holds and the most keys of one object; the server refuses what no request of
its context needs and parses the rest itself, at a cost it has bounded. A worker that runs
past `timeout` is killed and replaced (familial.serve.workers).

Protocol: the parent sends each body as 8 bytes of length (big-endian) and the bytes; the
worker answers one JSON line, {"items", "keys"} or {"error"}.
"""

from __future__ import annotations

import asyncio
import json
import sys

from familial.serve.workers import WorkerPool

# Address space of a worker: parsing 8 MiB of JSON needs well under 1 GiB.
WORKER_MEMORY_BYTES = 2**30


class BodyWorkers(WorkerPool):
    """A pool of body-measuring workers (start() and close() in the server's loop)."""

    def __init__(self, workers: int = 1, timeout: float = 10.0) -> None:
        super().__init__(workers, timeout)

    async def measure(self, body: bytes) -> dict:
        """{"items": JSON values and keys, "keys": most keys of one object}, or {"error"}."""
        try:
            line = await self.ask(len(body).to_bytes(8, "big") + body)
        except asyncio.TimeoutError:
            return {"error": f"it was not parsed within {self.timeout:g} s"}
        return json.loads(line) if line else {"error": "its parser ended (over its memory limit?)"}

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await self._launch(sys.executable, "-m", "familial.serve.bodies", str(WORKER_MEMORY_BYTES))


def measure(data) -> dict:
    """Items (values and keys) of parsed JSON `data`, and the most keys of one of its objects."""
    items, keys, stack = 0, 0, [data]
    while stack:
        value = stack.pop()
        items += 1
        if isinstance(value, dict):
            items += len(value)
            keys = max(keys, len(value))
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return {"items": items, "keys": keys}


def _serve(stdin, stdout) -> None:
    """The worker: one body in, one line out, until the parent closes the pipe."""
    while len(head := stdin.read(8)) == 8:
        body = stdin.read(int.from_bytes(head, "big"))
        try:
            reply = measure(json.loads(body))
        except (ValueError, RecursionError) as error:
            reply = {"error": f"{type(error).__name__}: {error}"}
        stdout.write(json.dumps(reply).encode() + b"\n")
        stdout.flush()


if __name__ == "__main__":
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
    _serve(sys.stdin.buffer, sys.stdout.buffer)
