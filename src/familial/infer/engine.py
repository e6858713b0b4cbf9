"""The family runtime: one copy of the weights serving every member, per request.

Requests wait in a bounded queue; between decode steps waiting requests take a free cache
slot (prefill) and finished or cancelled ones leave. Each step runs the trunk once for all
plain and adaptive sequences, whatever their member or length (see familial.infer.runner);
speculative sequences then take one draft-and-verify round each. A background thread drives
the loop for a server; `generate` drives it inline when no thread runs.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from familial.config import ConfigError
from familial.infer.adaptive import AdaptiveState, ExitPolicy
from familial.infer.cache import SlotCache
from familial.infer.runner import Row, Runner
from familial.infer.sampling import Sampler, SamplingParams
from familial.infer.speculative import SpeculativeDecoder
from familial.model import FamilyModel


@dataclass
class TokenEvent:
    token_id: int | None
    # newly detokenised text ('' without a tokenizer, or while a stop string may be forming).
    text: str
    # exit layer whose head produced this token.
    exit: int | None
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass
class GenerationResult:
    token_ids: list[int]
    exits: list[int]
    finish_reason: str
    text: str
    prompt_tokens: int
    error: str | None = None
    # speculative requests: drafted tokens and how many the verifier accepted.
    drafted: int = 0
    accepted: int = 0


class QueueFull(Exception):
    """The engine's queue is full: the caller should retry later (HTTP 429/503)."""


class RequestHandle:
    """A submitted request's stream of TokenEvents (thread-safe)."""

    def __init__(self, request_id: str, prompt_tokens: int, wake: threading.Condition) -> None:
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self.completion_tokens = 0
        # speculative requests: tokens drafted and accepted by the verifier so far.
        self.drafted = self.accepted = 0
        self._events: queue.Queue[TokenEvent] = queue.Queue()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._wake = wake

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._events.get()
            yield event
            if event.finished:
                return

    def get(self, timeout: float | None = None) -> TokenEvent:
        return self._events.get(timeout=timeout)

    def cancel(self) -> None:
        self._cancelled.set()
        with self._wake:
            self._wake.notify_all()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _put(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.completion_tokens += 1
        if event.finished:
            self._done.set()
        self._events.put(event)


@dataclass
class _Sequence:
    handle: RequestHandle
    prompt: list[int]
    member: int
    params: SamplingParams
    sampler: Sampler
    adaptive: AdaptiveState | None = None
    speculative: SpeculativeDecoder | None = None
    slot: int = -1
    # positions whose KV every needed layer holds; `pending` (the last token) is not yet in.
    length: int = 0
    pending: int = -1
    generated: list[int] = field(default_factory=list)
    sent: str = ""


def suggested_threads(config) -> int | None:
    """Intra-op threads for decoding on CPU: 1 for small models, whose decode steps are
    dispatch-bound (extra threads there only spin and contend: ~10x slower on a busy 2-core
    machine), else None (keep torch's default). torch's setting is process-wide, so the
    caller (CLI, server) applies it."""
    return 1 if config.hidden_size * config.num_hidden_layers <= 16384 else None


class Engine:
    def __init__(self, model: FamilyModel, tokenizer=None, max_batch_size: int = 8, max_queue: int = 64,
                 device: str = "cpu", max_seq_len: int | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_queue ({max_queue}) must be >= 1")
        self.model = model.to(device).eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_seq_len = max_seq_len or min(self.config.max_position_embeddings, 4096)
        dtype = next(model.parameters()).dtype
        self.cache = SlotCache(self.config, max_batch_size, self.max_seq_len, dtype, device)
        self.runner = Runner(self.model, self.cache)
        eos = self.config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}
        self._free = list(range(max_batch_size))
        self._wake = threading.Condition()
        self._drive = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()

    @classmethod
    def from_checkpoint(cls, family_dir: str | Path, dtype: torch.dtype | None = None, **kwargs) -> "Engine":
        from familial.checkpoint_io import load_family

        family_dir = Path(family_dir)
        model = load_family(family_dir, dtype=dtype, device=kwargs.get("device", "cpu"))
        tokenizer = None
        if (family_dir / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            path = family_dir / "tokenizer.json"
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception
                raise ConfigError(f"{path}: not a readable tokenizer ({error})") from None
            size = tokenizer.get_vocab_size(with_added_tokens=True)
            if size > model.config.vocab_size:
                raise ConfigError(f"{path}: {size} tokens, but {family_dir / 'family.json'} has vocab_size "
                                  f"{model.config.vocab_size} (the tokenizer belongs to another model)")
        return cls(model, tokenizer=tokenizer, **kwargs)

    def members(self) -> list[dict]:
        config = self.config
        listing = [{"id": f"exit-{e}", "exit": e,
                    "aliases": [a for a, x in config.member_names.items() if x == e],
                    "layers": config.member_layers(e)} for e in config.exits]
        listing.append({"id": "auto", "exit": None, "aliases": [], "layers": config.num_hidden_layers})
        return listing

    def stats(self) -> dict:
        """Queue and batch occupancy, for health checks."""
        with self._wake:
            return {"queued": len(self._waiting), "running": len(self._active),
                    "free_slots": len(self._free), "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue,
                    "alive": self._thread is not None and self._thread.is_alive()}

    # Requests.

    def submit(self, prompt_ids: list[int], member: int | str = -1, params: SamplingParams | None = None,
               speculative: bool | int | str | None = None, budget: float | None = None,
               _force: bool = False) -> RequestHandle:
        """Queue a request; raises QueueFull when the queue is full, ValueError on bad input."""
        sequence = self._make_sequence(prompt_ids, member, params, speculative, budget)
        with self._wake:
            if len(self._waiting) >= self.max_queue and not _force:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue "
                                f"{self.max_queue})")
            self._waiting.append(sequence)
            self._wake.notify_all()
        return sequence.handle

    def generate(self, prompts: list[list[int]], member: int | str = -1, params: SamplingParams | None = None,
                 speculative: bool | int | str | None = None, budget: float | None = None) -> list[GenerationResult]:
        """Run prompts to completion (batched) and return their tokens, exits and finish reasons."""
        handles = [self.submit(p, member, params, speculative, budget, _force=True) for p in prompts]
        if self._thread is None:
            with self._drive:
                while not all(h.done for h in handles):
                    self._step()
        results = []
        for handle in handles:
            events = list(handle)
            last = events[-1]
            tokens = [e for e in events if e.token_id is not None]
            results.append(GenerationResult([e.token_id for e in tokens], [e.exit for e in tokens],
                                            last.finish_reason, "".join(e.text for e in events),
                                            handle.prompt_tokens, last.error, handle.drafted,
                                            handle.accepted))
        return results

    def _make_sequence(self, prompt_ids, member, params, speculative, budget) -> _Sequence:
        config = self.config
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise ValueError("prompt_ids: expected a non-empty list of token ids")
        for t in prompt_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.vocab_size:
                raise ValueError(f"prompt_ids: token {t!r} is not an id in [0, {config.vocab_size})")
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_seq_len "
                             f"{self.max_seq_len}")
        params = params or SamplingParams()
        params.validate()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (tokenizer.json in the family directory)")
        auto = member == "auto" or budget is not None
        try:
            exit_layer = config.exits[-1] if member == "auto" else config.resolve_member(member)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        handle = RequestHandle(f"req-{next(self._ids)}", len(prompt_ids), self._wake)
        sequence = _Sequence(handle, list(prompt_ids), exit_layer, params, Sampler(params))
        if auto:
            if speculative:
                raise ValueError("speculative decoding and adaptive exit ('auto' or budget) exclude each other")
            sequence.adaptive = AdaptiveState(config, ExitPolicy.from_config(config), budget)
        elif speculative not in (None, False):
            sequence.speculative = SpeculativeDecoder(self.runner, self.draft_chain(exit_layer, speculative))
        return sequence

    def draft_chain(self, verifier: int, speculative: bool | int | str) -> list[int]:
        """Exits from drafter to verifier: True -> the smallest member drafts; "cascade" ->
        every member up to the verifier; a member (or "a,b" members) -> those draft."""
        config = self.config
        below = [e for e in config.exits if e < verifier]
        if not below:
            raise ValueError(f"member exit-{verifier} is the smallest: no member can draft for it")
        if speculative is True:
            chain = [below[0]]
        elif speculative == "cascade":
            chain = below
        else:
            parts = speculative.split(",") if isinstance(speculative, str) else [speculative]
            try:
                chain = sorted({config.resolve_member(p) for p in parts})
            except ConfigError as error:
                raise ValueError(f"speculative: {error}") from None
        if chain[-1] >= verifier:
            raise ValueError(f"speculative: drafters {chain} must be smaller than the verifier exit-{verifier}")
        return chain + [verifier]

    # The loop.

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="familial-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._wake:
            for sequence in list(self._waiting) + list(self._active.values()):
                self._finish(sequence, "cancelled")
            self._waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._active:
                    self._wake.wait()
                if self._stopping:
                    return
            with self._drive:
                self._step()

    def _step(self) -> None:
        """Admit waiting requests, drop cancelled ones, then advance every sequence once."""
        admitted = []
        with self._wake:
            for sequence in [s for s in self._waiting if s.handle._cancelled.is_set()]:
                self._waiting.remove(sequence)
                self._finish(sequence, "cancelled")
            for sequence in [s for s in self._active.values() if s.handle._cancelled.is_set()]:
                self._finish(sequence, "cancelled")
            while self._free and self._waiting:
                sequence = self._waiting.popleft()
                sequence.slot = self._free.pop(0)
                self._active[sequence.slot] = sequence
                admitted.append(sequence)
        for sequence in admitted:
            self._guard([sequence], self._prefill, sequence)
        plain = [s for s in self._active.values() if s.speculative is None and not s.handle.done]
        if plain:
            self._guard(plain, self._decode, plain)
        for sequence in [s for s in self._active.values() if s.speculative is not None]:
            if not sequence.handle.done:
                self._guard([sequence], self._speculate, sequence)

    def _guard(self, sequences: list[_Sequence], work, *args) -> None:
        # A failure ends the requests involved with an error event; the engine keeps serving.
        try:
            work(*args)
        except Exception as error:  # noqa: BLE001 - reported to the request, not swallowed
            with self._wake:
                for sequence in sequences:
                    if not sequence.handle.done:
                        self._finish(sequence, "error", f"{type(error).__name__}: {error}")

    def _prefill(self, sequence: _Sequence) -> None:
        # Prompt KV for every branch the request may use later: all earlier exits when
        # adaptive, the drafters' when speculative.
        adaptive = sequence.adaptive
        extra = frozenset()
        if adaptive:
            extra = frozenset(e for e in self.config.exits[:-1] if e < sequence.member)
        elif sequence.speculative:
            extra = frozenset(sequence.speculative.chain[:-1])
        row = Row(sequence.slot, 0, sequence.member, decide=adaptive.decide if adaptive else None,
                  extra_branches=extra, full_kv=adaptive is not None)
        prompt = torch.tensor([sequence.prompt], device=self.device)
        out = self.runner.forward([row], tokens=prompt)[0]
        sequence.length = len(sequence.prompt)
        self._accept(sequence, sequence.sampler.choose(out.logits[-1], sequence.prompt), out.exit)

    def _decode(self, sequences: list[_Sequence]) -> None:
        rows = [Row(s.slot, s.length, s.member, decide=s.adaptive.decide if s.adaptive else None)
                for s in sequences]
        tokens = torch.tensor([[s.pending] for s in sequences], device=self.device)
        outputs = self.runner.forward(rows, tokens=tokens)
        for sequence, out in zip(sequences, outputs):
            sequence.length += 1
            token = sequence.sampler.choose(out.logits[-1], sequence.prompt + sequence.generated)
            self._accept(sequence, token, out.exit)

    def _speculate(self, sequence: _Sequence) -> None:
        limit = min(sequence.params.max_new_tokens - len(sequence.generated),
                    self.max_seq_len - sequence.length - 1)
        tokens = sequence.speculative.round(sequence.slot, sequence.length, sequence.pending,
                                            sequence.prompt + sequence.generated, sequence.sampler, limit)
        sequence.length += len(tokens)
        sequence.handle.drafted = sequence.speculative.proposed
        sequence.handle.accepted = sequence.speculative.accepted
        for token in tokens:
            if sequence.handle.done:
                break
            self._accept(sequence, token, sequence.member)

    def _accept(self, sequence: _Sequence, token: int, exit_layer: int) -> None:
        """Commit one token: stream it, and finish the request on eos, stop string or length."""
        if sequence.adaptive:
            sequence.adaptive.record(exit_layer)
        sequence.generated.append(token)
        sequence.pending = token
        reason = None
        if token in self.eos or token in sequence.params.stop_token_ids:
            reason = "stop"
        elif len(sequence.generated) >= sequence.params.max_new_tokens \
                or sequence.length + 1 >= self.max_seq_len:
            reason = "length"
        text, stopped = self._text(sequence, final=reason is not None)
        reason = "stop" if stopped else reason
        with self._wake:
            sequence.handle._put(TokenEvent(token, text, exit_layer, reason is not None, reason))
            if reason is not None:
                self._release(sequence)

    def _text(self, sequence: _Sequence, final: bool) -> tuple[str, bool]:
        """Text new since the last event, holding back what might still become a stop string."""
        if self.tokenizer is None:
            return "", False
        ends = self.eos.union(sequence.params.stop_token_ids)
        ids = [t for t in sequence.generated if t not in ends]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        stops = sequence.params.stop
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            text, final = text[:min(hits)], True
        safe = len(text)
        if not final:
            while safe and text[safe - 1] == "\ufffd":
                safe -= 1
            for stop in stops:
                for n in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:n]):
                        safe -= n
                        break
        delta = text[len(sequence.sent):safe]
        sequence.sent = text[:safe]
        return delta, bool(hits)

    def _finish(self, sequence: _Sequence, reason: str, error: str | None = None) -> None:
        """End a request with an event carrying no token (called holding self._wake)."""
        sequence.handle._put(TokenEvent(None, "", None, True, reason, error))
        self._release(sequence)

    def _release(self, sequence: _Sequence) -> None:
        if self._active.get(sequence.slot) is sequence:
            del self._active[sequence.slot]
            self._free.append(sequence.slot)
