"""Worker processes that take one request at a time, for work the event loop must not run.

A worker that outlasts `timeout` is killed and a fresh one takes its place; one that dies
(over its memory limit) is replaced on its next turn. Chat templates (familial.serve.templates)
and large request bodies (familial.serve.bodies) each keep a pool; the subclass says how a
worker starts and what it is sent.
"""

from __future__ import annotations

import asyncio


class WorkerPool:
    """`workers` processes (start() and close() in the server's loop)."""

    def __init__(self, workers: int, timeout: float) -> None:
        self.count, self.timeout = workers, timeout
        self.idle: asyncio.Queue[asyncio.subprocess.Process] = asyncio.Queue()
        self.all: set[asyncio.subprocess.Process] = set()

    async def start(self) -> None:
        for worker in await asyncio.gather(*(self._spawn() for _ in range(self.count))):
            self.idle.put_nowait(worker)

    async def close(self) -> None:
        for worker in list(self.all):
            await self._end(worker)

    async def ask(self, message: bytes) -> bytes:
        """An idle worker's one-line reply to `message`; b"" if the worker ended first. Raises
        asyncio.TimeoutError, having killed the worker, when it does not answer in time."""
        worker = await self.idle.get()
        try:
            if worker.returncode is not None:
                worker = await self._spawn()  # the last request ended it
            worker.stdin.write(message)
            await worker.stdin.drain()
            return await asyncio.wait_for(worker.stdout.readline(), self.timeout)
        except asyncio.TimeoutError:
            await self._end(worker)
            raise
        except (OSError, ValueError):
            await self._end(worker)
            return b""
        finally:
            self.idle.put_nowait(worker)

    async def _spawn(self) -> asyncio.subprocess.Process:
        raise NotImplementedError

    async def _launch(self, *argv: str, **options) -> asyncio.subprocess.Process:
        worker = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                      stdout=asyncio.subprocess.PIPE, **options)
        self.all.add(worker)
        return worker

    async def _end(self, worker: asyncio.subprocess.Process) -> None:
        self.all.discard(worker)
        if worker.returncode is None:
            worker.kill()
        await worker.wait()
