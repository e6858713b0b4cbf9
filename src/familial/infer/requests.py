"""What a caller of the engine holds: a request's handle, its stream of events, its result."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from familial.infer.sampling import SamplingParams


@dataclass
class TokenEvent:
    token_id: int | None
    # newly detokenised text ('' without a tokenizer, or while a stop string may be forming).
    text: str
    # exit layer whose head produced this token.
    exit: int | None
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "error"
    # with finish_reason "error": what went wrong with this request (the others carry on).
    error: str | None = None


@dataclass
class Request:
    """What a caller asks the engine for: Engine.add_request takes it, and an engine process
    receives it whole over its socket (familial.infer.process)."""

    prompt_ids: list[int]
    # a member name, exit, or "auto" (adaptive exit).
    member: int | str = -1
    params: SamplingParams | None = None
    speculative: bool | int | str | None = None
    # adaptive exit: a cap on average depth (a fraction of the layers), or the agreement to hold.
    budget: float | None = None
    target: float | None = None
    # queued past `max_queue` (generate's prompts are all taken at once).
    force: bool = False


@dataclass
class GenerationResult:
    token_ids: list[int]
    exits: list[int]
    finish_reason: str
    text: str
    prompt_tokens: int
    error: str | None = None
    # speculative requests: tokens drafted for the verifier and how many it accepted.
    drafted: int = 0
    accepted: int = 0


class InvalidRequest(ValueError):
    """A request the engine refuses; `param` names the field at fault, for an API's error body
    (the engine checks a request once, where it enters: a server does not check it again)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):
        # Raised in an engine process and re-raised in the server's (familial.infer.process).
        return type(self), (str(self), self.param)


class QueueFull(Exception):
    """The engine's queue is full: the caller should retry later (HTTP 429/503)."""


class RequestHandle:
    """A submitted request's stream of TokenEvents (thread-safe)."""

    def __init__(self, request_id: str, prompt_tokens: int, wake: threading.Condition) -> None:
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self.completion_tokens = 0
        # speculative requests: tokens drafted for the verifier and accepted by it so far.
        self.speculative = False
        self.drafted = self.accepted = 0
        self._events: queue.Queue[TokenEvent] = queue.Queue()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._wake = wake
        self._listener = None

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._events.get()
            yield event
            if event.finished:
                return

    def get(self, timeout: float | None = None) -> TokenEvent:
        return self._events.get(timeout=timeout)

    def drain(self) -> list[TokenEvent]:
        """Every event waiting now, without blocking (possibly none)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def listen(self, callback) -> None:
        """Call `callback()` (from the engine's thread) after each new event, so an event loop
        can wait for events without a thread blocked in `get` per request."""
        self._listener = callback

    def cancel(self) -> None:
        self._cancelled.set()
        with self._wake:
            self._wake.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def speculative_stats(self) -> dict | None:
        """Drafted and accepted tokens and their ratio, for a speculative request."""
        if not self.speculative:
            return None
        return {"drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.accepted / max(self.drafted, 1), 4)}

    def _put(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.completion_tokens += 1
        if event.finished:
            self._done.set()
        self._events.put(event)
        if self._listener is not None:
            self._listener()


def result_of(handle: RequestHandle) -> GenerationResult:
    """Wait for a request to finish and gather its tokens, exits, text and finish reason."""
    events = list(handle)
    last = events[-1]
    tokens = [e for e in events if e.token_id is not None]
    return GenerationResult([e.token_id for e in tokens], [e.exit for e in tokens], last.finish_reason,
                            "".join(e.text for e in events), handle.prompt_tokens, last.error,
                            handle.drafted, handle.accepted)
