"""The engine in a process of its own, behind the engine's own request API.

`familial serve` runs the HTTP side (parsing, tokenising, streaming) and the engine in two
processes, as vLLM runs its API server and engine core: in one process the two share the
interpreter lock, and every step of the engine waits while the event loop writes chunks (at
many concurrent streams a measurable share of the engine's throughput). `EngineProcess` starts an
`Engine` in a child interpreter and offers what a server uses of one: `submit` returning a
`RequestHandle`, `generate`, `stats`, `members`, `config`, `tokenizer` and the size limits.

One socket pair carries everything. The parent sends calls (submit, cancel, stats, stop), each
answered in order; the child sends, after each engine step, the step's events of every request
in one message. Request ids are the parent's, registered before the call is sent, so events
never arrive for a handle the parent does not know yet. The parent writes from a thread of its
own, so a caller never waits on the socket (a stopped child that reads nothing cannot stall an
event loop that cancels a request); only the calls that need an answer (submit, stats, stop)
wait for it. If the child dies, every open request ends as cancelled (its `error` saying why),
`stats()` reports the engine not alive, `ended` says why, and the callbacks given to `on_end`
run (not when `stop()` ended it); if the parent dies, the child reads the end of the socket and
exits.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from familial.infer.requests import GenerationResult, QueueFull, Request, RequestHandle, TokenEvent, result_of

START_TIMEOUT = 600.0
CALL_TIMEOUT = 60.0
# A health check waits this long: the child answers between the ops of a step, however long.
STATS_TIMEOUT = 5.0
# The child's interpreter switch interval (Python's default: 5 ms), see `_child`.
SWITCH_INTERVAL = 0.0005


class EngineProcessError(RuntimeError):
    """The engine process is gone or does not answer."""


class _Handle(RequestHandle):
    """A request's handle in the parent: events arrive from the child; cancel tells the child."""

    def __init__(self, request_id: str, prompt_tokens: int, engine: EngineProcess) -> None:
        super().__init__(request_id, prompt_tokens, threading.Condition())
        self._engine = engine

    def cancel(self) -> None:
        if not self.cancelled and not self.done:
            super().cancel()
            self._engine._send(("cancel", self.request_id))


class EngineProcess:
    """An Engine loaded from `family_dir` with `options` (Engine.from_checkpoint's), running in
    a child process with `threads` intra-op threads (None: `suggested_threads`, else torch's)."""

    def __init__(self, family_dir: str | Path, threads: int | None = None, **options) -> None:
        # A plain child interpreter on one end of a socket pair, not multiprocessing's spawn: that
        # would import the caller's main script again in the child, and leave a resource-tracker
        # process behind.
        ours, theirs = socket.socketpair()
        # The child imports familial from where this process did (a source tree on sys.path too).
        source = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])
        with theirs:
            self._process = subprocess.Popen([sys.executable, "-m", "familial.infer.process", str(theirs.fileno())],
                                             pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                             env={**os.environ, "PYTHONPATH": path})
        self._connection = Connection(ours.detach())
        self._connection.send((str(family_dir), threads, options))
        if not self._connection.poll(START_TIMEOUT):
            self._process.kill()
            raise EngineProcessError(f"the engine process did not load {family_dir} within {START_TIMEOUT:.0f} s")
        try:
            kind, info = self._connection.recv()
        except EOFError:
            raise EngineProcessError(f"the engine process ended while loading {family_dir} "
                                     f"(exit code {self._process.wait()})") from None
        if kind == "failed":
            self._process.wait()
            raise info
        self.config, self.tokenizer = info["config"], info["tokenizer"]
        self.max_seq_len, self.max_batch_size, self.max_queue = (
            info["max_seq_len"], info["max_batch_size"], info["max_queue"])
        self.threads, self.warm_up_s, self._members = info["threads"], info["warm_up_s"], info["members"]
        self.kernels = info["kernels"]
        self._outgoing: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._handles: dict[str, _Handle] = {}
        self._replies: dict[int, list] = {}
        self._calls = itertools.count()
        self._ids = itertools.count()
        self._ended: str | None = None
        self._stopping = False
        self._end_callbacks: list = []
        self._reader = threading.Thread(target=self._read, name="familial-engine-reader", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write, name="familial-engine-writer", daemon=True)
        self._writer.start()

    @property
    def ended(self) -> str | None:
        """Why the engine process has ended (None while it runs)."""
        return self._ended

    def on_end(self, callback) -> None:
        """Call `callback(reason)` (on the reader's thread) if the engine process ends without
        `stop()`: it died, and nothing more will be served."""
        with self._lock:
            self._end_callbacks.append(callback)
            reason = self._ended if not self._stopping else None
        if reason is not None:
            callback(reason)

    def members(self) -> list[dict]:
        return [dict(m) for m in self._members]

    def start(self) -> None:
        """The child's engine runs from the moment it has loaded (kept for Engine's API)."""

    def stats(self) -> dict:
        """Engine.stats() of the child; "alive" False once it has ended or does not answer."""
        try:
            return self._call("stats", timeout=STATS_TIMEOUT)
        except EngineProcessError:
            return {"queued": 0, "running": 0, "free_slots": 0, "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue, "alive": False}

    def submit(self, prompt_ids: list[int], member: int | str = -1, params=None,
               speculative: bool | int | str | None = None, budget: float | None = None,
               target: float | None = None, _force: bool = False) -> RequestHandle:
        """As Engine.submit: QueueFull when the queue is full, ValueError on bad input."""
        request_id = f"req-{next(self._ids)}"
        handle = _Handle(request_id, len(prompt_ids) if isinstance(prompt_ids, (list, tuple)) else 0, self)
        with self._lock:
            self._handles[request_id] = handle
        try:
            request = Request(prompt_ids, member, params, speculative, budget, target, _force)
            speculating = self._call("submit", request_id, request, timeout=CALL_TIMEOUT)
        except BaseException:
            with self._lock:
                self._handles.pop(request_id, None)
            raise
        handle.speculative = speculating
        return handle

    def generate(self, prompts: list[list[int]], member: int | str = -1, params=None,
                 speculative: bool | int | str | None = None, budget: float | None = None,
                 target: float | None = None) -> list[GenerationResult]:
        handles = [self.submit(p, member, params, speculative, budget, target, _force=True) for p in prompts]
        return [result_of(handle) for handle in handles]

    def stop(self) -> None:
        """Cancel what is left, end the child (killed if it does not end within a minute)."""
        with self._lock:
            self._stopping = True
        if self._ended is None:
            try:
                self._call("stop", timeout=CALL_TIMEOUT)
            except EngineProcessError:
                pass
        try:
            self._process.wait(timeout=CALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=CALL_TIMEOUT)
        self._outgoing.put(None)
        self._writer.join(timeout=CALL_TIMEOUT)
        self._connection.close()

    def _send(self, message: tuple) -> None:
        """Queue `message` for the child; never waits (the writer thread sends it)."""
        if self._ended is None:
            self._outgoing.put(message)

    def _write(self) -> None:
        while (message := self._outgoing.get()) is not None:
            try:
                self._connection.send(message)
            except OSError:
                return  # the engine process is gone: the reader ends every request and call

    def _call(self, name: str, *args, timeout: float):
        call = next(self._calls)
        done = threading.Event()
        slot = [done, None, None]
        with self._lock:
            if self._ended is not None:
                raise EngineProcessError(self._ended)
            self._replies[call] = slot
        self._send((name, call, *args))
        if not done.wait(timeout):
            with self._lock:
                self._replies.pop(call, None)
            raise EngineProcessError(f"the engine process did not answer '{name}' within {timeout:.0f} s")
        if slot[2] is not None:
            raise slot[2]
        return slot[1]

    def _read(self) -> None:
        """The parent's one reader: replies to calls, and each engine step's events."""
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                break
            if message[0] == "events":
                with self._lock:
                    handles = [(self._handles.get(rid), events, counts) for rid, events, counts in message[1]]
                for handle, events, (drafted, accepted) in handles:
                    if handle is None:
                        continue
                    handle.drafted, handle.accepted = drafted, accepted
                    for event in events:
                        handle._put(event)
                        if event.finished:
                            with self._lock:
                                self._handles.pop(handle.request_id, None)
            else:
                _, call, value, error = message
                with self._lock:
                    slot = self._replies.pop(call, None)
                if slot is not None:
                    slot[1], slot[2] = value, error
                    slot[0].set()
        self._end(f"the engine process ended (exit code {self._process.wait()})")

    def _end(self, reason: str) -> None:
        with self._lock:
            self._ended = reason
            handles, self._handles = list(self._handles.values()), {}
            replies, self._replies = list(self._replies.values()), {}
            callbacks = [] if self._stopping else list(self._end_callbacks)
        self._outgoing.put(None)
        for slot in replies:
            slot[2] = EngineProcessError(reason)
            slot[0].set()
        for handle in handles:
            if not handle.done:
                handle._put(TokenEvent(None, "", None, True, "cancelled", reason))
        for callback in callbacks:
            callback(reason)


def _child(connection) -> None:
    """The engine process: load, report, then serve calls until told to stop or the parent goes."""
    import torch

    from familial.infer.engine import Engine, suggested_threads

    # Ctrl-C in a terminal reaches the whole process group: the parent decides when this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    family_dir, threads, options = connection.recv()
    try:
        engine = Engine.from_checkpoint(family_dir, **options)
    except (ValueError, OSError) as error:
        # What a user can act on (a missing file, a bad value) is raised again in the parent;
        # anything else is a bug, whose traceback this process prints.
        connection.send(("failed", error))
        return
    threads = threads or suggested_threads(engine.config)
    if threads:
        torch.set_num_threads(threads)
    # The thread taking calls and the engine's step thread share the interpreter lock; at the
    # default interval each waited up to 5 ms for the other's Python, the step's other intra-op
    # threads spinning meanwhile: while a burst of 32 requests arrived, 512-token steps at hidden
    # 512 on two threads took 220-290 ms instead of 150 (and the burst took several steps to get in).
    sys.setswitchinterval(SWITCH_INTERVAL)
    warm_up_s = engine.warm_up()
    outbox = _Outbox(connection)
    engine.after_step = outbox.flush
    connection.send(("ready", {"config": engine.config, "tokenizer": engine.tokenizer,
                               "max_seq_len": engine.max_seq_len, "max_batch_size": engine.max_batch_size,
                               "max_queue": engine.max_queue, "members": engine.members(),
                               "threads": torch.get_num_threads(), "warm_up_s": warm_up_s,
                               "kernels": engine.runner.kernels.describe()}))
    # Steps run on this thread, which loaded the model and so already has the process's team of
    # intra-op threads (a second team throttles both: Engine.run); calls are taken on another.
    try:
        engine.run_with(lambda: _serve_calls(connection, engine, outbox))
    finally:
        outbox.flush()


def _serve_calls(connection, engine, outbox: _Outbox) -> None:
    """Take the parent's calls until it says stop or goes (the engine's loop then stops)."""
    handles: dict[str, RequestHandle] = {}
    while True:
        try:
            name, call, *args = connection.recv()
        except (EOFError, OSError):
            return
        if name == "cancel":
            handle = handles.pop(call, None)
            if handle is not None:
                handle.cancel()
            continue
        value = error = None
        if name == "stop":
            engine.stop()
            outbox.flush()
            outbox.send(("reply", call, None, None))
            return
        if name == "stats":
            value = engine.stats()
        elif name == "submit":
            request_id, request = args
            try:
                handle = engine.add_request(request)
            except (QueueFull, ValueError) as failure:
                error = failure
            else:
                handles[request_id] = handle
                outbox.watch(request_id, handle)
                value = handle.speculative
        outbox.send(("reply", call, value, error))
        for request_id in [r for r, h in handles.items() if h.done]:
            del handles[request_id]


class _Outbox:
    """Events of watched requests, sent in one message per engine step (from the engine's
    thread, right after the step), so a step costs one write however many streams run."""

    def __init__(self, connection) -> None:
        self.connection = connection
        # `flushing` keeps each request's events in order when two threads flush; `lock`
        # guards the set of requests with new events, which the engine's thread fills (never
        # held while writing, so a slow reader cannot stall the engine's step).
        self.flushing = threading.Lock()
        self.lock = threading.Lock()
        self.sending = threading.Lock()
        self.ready: dict[str, RequestHandle] = {}

    def watch(self, request_id: str, handle: RequestHandle) -> None:
        """Send this request's events from now on, and those it had before it was watched (the
        engine may have stepped, even finished it, while it was being submitted)."""
        handle.listen(lambda: self._ready(request_id, handle))
        self._ready(request_id, handle)
        self.flush()

    def _ready(self, request_id: str, handle: RequestHandle) -> None:
        with self.lock:
            self.ready[request_id] = handle

    def flush(self) -> None:
        with self.flushing:
            with self.lock:
                ready, self.ready = self.ready, {}
            batch = []
            for request_id, handle in ready.items():
                events = handle.drain()
                if events:
                    batch.append((request_id, events, (handle.drafted, handle.accepted)))
            if batch:
                self.send(("events", batch))

    def send(self, message: tuple) -> None:
        with self.sending:
            try:
                self.connection.send(message)
            except OSError:
                pass  # the parent is gone: the main thread reads the end of the socket and exits


if __name__ == "__main__":
    _child(Connection(int(sys.argv[1])))
