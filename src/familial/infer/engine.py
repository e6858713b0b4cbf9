"""The family runtime: one copy of the weights serving every member, per request.

The engine core runs, each step, plan -> runner -> outputs, as vLLM v1's does: the scheduler
(familial.infer.scheduler) admits waiting requests into free cache slots and plans the step
(every decoding sequence's next token plus prompt chunks within `max_prefill_tokens`, and the
speculative rounds); the packed call (familial.infer.runner) runs every planned row at once,
whatever its member or length; tokens are chosen for the whole call at once on the device
(familial.infer.sampling), and output processing (familial.infer.outputs) turns each into its
request's event. Speculative sequences take one draft-and-verify round together
(familial.infer.speculative), each drafting only while its own measured acceptance makes it
pay (familial.infer.draft_policy). Input processing (`_make_sequence`) checks a `Request` once,
where it enters. A background thread drives the loop for a server; `generate` drives it inline
when no thread runs.

Isolation: a failure ends only the requests it belongs to. Choosing a token, detokenising and
stop handling run per sequence; if a batched call fails, its sequences are run again one by
one, so only the sequence that fails alone is ended. Such a request's handle receives a final
`TokenEvent` with finish_reason "error" and `error` saying what failed ("<Type>: <message>");
no token of it was lost or duplicated before that. The other requests continue untouched. A
server answers it as an error for that request alone (an error event on a stream, an error
response otherwise); every sampling value `SamplingParams.validate` accepts is numerically safe,
so this path is for faults, not for inputs.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from familial import checks
from familial.allocator import retain_freed_memory
from familial.config import ConfigError
from familial.infer.adaptive import AdaptiveState, EarlyExit
from familial.infer.cache import SlotCache
from familial.infer.detokenize import TextStream
from familial.infer.draft_policy import CallCosts, DraftPolicy, Plan, PooledAcceptance
from familial.infer.outputs import OutputProcessor
from familial.infer.requests import (
    GenerationResult,
    InvalidRequest,
    QueueFull,
    Request,
    RequestHandle,
    TokenEvent,
    result_of,
)
from familial.infer.runner import Adaptive, Row, Runner
from familial.infer.sampling import Draw, SamplingParams, choose, request_seed
from familial.infer.scheduler import Scheduler, SchedulerOutput
from familial.infer.speculative import Proposal, Speculator
from familial.model import FamilyModel
from familial.threads import serving_threads

__all__ = ["DTYPES", "Engine", "GenerationResult", "QueueFull", "Request", "RequestHandle", "TokenEvent",
           "suggested_threads"]


@dataclass
class _Speculation:
    policy: DraftPolicy
    # drafter exit -> positions below which its branch holds KV (plain steps do not write it).
    filled: dict[int, int]
    # a plan waiting for its drafters' KV to catch up (this step), used next step.
    waiting: Plan | None = None
    # this step's round.
    plan: Plan | None = None


@dataclass
class _Sequence:
    handle: RequestHandle
    prompt: list[int]
    member: int
    params: SamplingParams
    seed: int
    adaptive: AdaptiveState | None = None
    speculation: _Speculation | None = None
    text: TextStream | None = None
    slot: int = -1
    # positions whose KV every needed layer holds; `pending` (the last token) is not yet in.
    length: int = 0
    pending: int = -1
    generated: list[int] = field(default_factory=list)
    # this step's packed call: `chunk` tokens from position `length` (a prompt chunk or the
    # pending token), and drafters' KV filled in from position `behind` up to `length`
    # (a speculative sequence resuming after plain steps).
    chunk: int = 0
    behind: int | None = None

    @property
    def prefilling(self) -> bool:
        return not self.generated

    def tokens(self) -> list[int]:
        return self.prompt + self.generated


# `--dtype` of `generate` and `serve` (absent: the checkpoint's own).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How adaptive rows supply the KV of layers a token skipped (familial.infer.runner).
EXIT_KV = ("recompute", "copy")


def suggested_threads(config) -> int:
    """Intra-op threads for decoding on CPU (familial.threads.serving_threads): one per core
    from hidden 512 up, else 1. torch's setting is process-wide, so the caller (CLI, server)
    applies it."""
    return serving_threads(config.hidden_size)[0]


class Engine:
    def __init__(self, model: FamilyModel, tokenizer=None, max_batch_size: int = 8, max_queue: int = 64,
                 device: str = "cpu", max_seq_len: int | None = None, max_prefill_tokens: int = 512,
                 early_exit: EarlyExit | None = None, exit_kv: str = "recompute", kernels: str = "auto") -> None:
        if max_batch_size < 1 or max_queue < 1 or max_prefill_tokens < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}), max_queue ({max_queue}) and "
                             f"max_prefill_tokens ({max_prefill_tokens}) must be >= 1")
        if exit_kv not in EXIT_KV:
            raise ValueError(f"exit_kv = {exit_kv!r}: expected one of {', '.join(EXIT_KV)}")
        self.model = model.to(device).eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        if self.device.type == "cpu":
            # Every step frees and reallocates its activations, a few MB each (familial.allocator).
            retain_freed_memory()
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.max_seq_len = max_seq_len or min(self.config.max_position_embeddings, 4096)
        self.exit_kv = exit_kv
        self.early_exit = early_exit
        if early_exit is not None and early_exit.classifier is not None:
            early_exit.classifier = early_exit.classifier.to(self.device)
        dtype = next(model.parameters()).dtype
        self.cache = SlotCache(self.config, max_batch_size, self.max_seq_len, dtype, device)
        self.runner = Runner(self.model, self.cache, kernels)
        # Packed weights are built here, not on the first request (familial.infer.kernels).
        self.runner.kernels.refresh()
        # Tokens each slot's sequence has seen, for the repetition penalty (penalised rows only).
        self.seen = torch.zeros(max_batch_size, self.config.vocab_size, dtype=torch.bool, device=self.device)
        self.costs = CallCosts(self.config)
        self.acceptance = PooledAcceptance()
        self.speculator = Speculator(self.runner, self._choose, self.costs)
        eos = self.config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.scheduler = Scheduler(max_batch_size, max_queue, max_prefill_tokens, self.costs)
        self.outputs = OutputProcessor(self.eos, self.max_seq_len)
        self._wake = threading.Condition()
        self._drive = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self._stopping = False
        self._ids = itertools.count()
        # Called on the engine's thread after each step of its loop (the engine process sends a
        # step's events in one message: familial.infer.process).
        self.after_step = None

    @classmethod
    def from_checkpoint(cls, family_dir: str | Path, dtype: torch.dtype | str | None = None, **kwargs) -> Engine:
        """Load a family checkpoint (and its tokenizer); `dtype` (a torch dtype or a name in
        DTYPES) converts the weights, and with them the KV cache."""
        from familial.checkpoint_io import load_family

        family_dir = Path(family_dir)
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
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
        if "early_exit" not in kwargs:
            kwargs["early_exit"] = EarlyExit.load(family_dir, model.config)
        return cls(model, tokenizer=tokenizer, **kwargs)

    def warm_up(self) -> float:
        """Run a short request through every member before serving; returns its seconds.

        A process's first forward pays once for what the kernels set up on first use (about
        0.25 s at hidden 512 on one thread, ten times a warm 16-token prefill), which would
        otherwise land on the first user's time to first token. Speculative requests are left
        out: their acceptance would seed the draft policy's statistics."""
        started = time.perf_counter()
        prompt = [0] * max(1, min(8, self.max_seq_len - 2))
        for exit_layer in self.config.exits:
            self.generate([prompt], member=f"exit-{exit_layer}", params=SamplingParams(max_new_tokens=2, greedy=True))
        return time.perf_counter() - started

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
            return {"queued": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                    "free_slots": len(self.scheduler.free), "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue,
                    "alive": self._running or (self._thread is not None and self._thread.is_alive())}

    # Requests.

    def submit(self, prompt_ids: list[int], member: int | str = -1, params: SamplingParams | None = None,
               speculative: bool | int | str | None = None, budget: float | None = None,
               target: float | None = None, _force: bool = False) -> RequestHandle:
        """Queue a request; raises QueueFull when the queue is full, ValueError on bad input.

        Adaptive exit: member "auto" (or, with `budget` or `target`, any member as the deepest
        exit). `target`: the agreement with the full member to hold, picking the request's
        calibrated operating point; `budget`: a cap on average depth (fraction of the layers).
        """
        return self.add_request(Request(prompt_ids, member, params, speculative, budget, target, _force))

    def add_request(self, request: Request) -> RequestHandle:
        """Queue a request (as `submit`)."""
        sequence = self._make_sequence(request)
        with self._wake:
            self.scheduler.add(sequence, request.force)
            self._wake.notify_all()
        return sequence.handle

    def generate(self, prompts: list[list[int]], member: int | str = -1,
                 params: SamplingParams | list[SamplingParams] | None = None,
                 speculative: bool | int | str | None = None, budget: float | None = None,
                 target: float | None = None) -> list[GenerationResult]:
        """Run prompts to completion (batched) and return their tokens, exits and finish reasons.
        `params` is one for every prompt, or a list with each prompt's own (e.g. its seed)."""
        each = params if isinstance(params, list) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"{len(each)} sampling parameters for {len(prompts)} prompts")
        handles = [self.submit(p, member, q, speculative, budget, target, _force=True)
                   for p, q in zip(prompts, each)]
        if self._thread is None:
            with self._drive:
                while not all(h.done for h in handles):
                    self._step()
        return [result_of(handle) for handle in handles]

    def _make_sequence(self, request: Request) -> _Sequence:
        """Input processing: the request checked, and the state its sequence starts with."""
        prompt_ids, speculative = request.prompt_ids, request.speculative
        budget, target = request.budget, request.target
        params = request.params or SamplingParams()
        exit_layer = self._check_request(prompt_ids, request.member, params)
        handle = RequestHandle(f"req-{next(self._ids)}", len(prompt_ids), self._wake)
        text = TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
        sequence = _Sequence(handle, list(prompt_ids), exit_layer, params, request_seed(params), text=text)
        if request.member == "auto" or budget is not None or target is not None:
            if speculative:
                raise ValueError("speculative decoding and adaptive exit ('auto', budget or target) exclude "
                                 "each other")
            rule = self._exit_rule(target)
            if not rule.off or budget is not None:
                sequence.adaptive = AdaptiveState(self.config, rule, exit_layer, budget, self.exit_kv == "recompute")
        elif speculative not in (None, False):
            candidates = self.draft_candidates(exit_layer, speculative)
            drafters = {e for chain in candidates for e in chain[:-1]}
            sequence.speculation = _Speculation(DraftPolicy(candidates, self.acceptance), dict.fromkeys(drafters, 0))
            handle.speculative = True
        return sequence

    def _check_request(self, prompt_ids, member, params: SamplingParams) -> int:
        """ValueError (InvalidRequest for the prompt) naming what is wrong with a request; its
        member's exit otherwise. The only check of a prompt's token ids (a server leaves it here)."""
        config = self.config
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise InvalidRequest("prompt_ids: expected a non-empty list of token ids (the prompt is empty after "
                                 "tokenization)", "prompt")
        for t in prompt_ids:
            if not checks.is_integer(t) or not 0 <= t < config.vocab_size:
                raise InvalidRequest(f"prompt_ids: token {t!r} is not an id in [0, {config.vocab_size}) (outside "
                                     f"the vocabulary)", "prompt")
        if len(prompt_ids) >= self.max_seq_len:
            raise InvalidRequest(f"prompt of {len(prompt_ids)} tokens does not fit max_seq_len "
                                 f"{self.max_seq_len}", "prompt")
        params.validate()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (tokenizer.json in the family directory)")
        try:
            return config.exits[-1] if member == "auto" else config.resolve_member(member)
        except ConfigError as error:
            raise ValueError(str(error)) from None

    def _exit_rule(self, target: float | None):
        if target is not None and (not checks.is_number(target) or not 0 < target <= 1):
            raise ValueError(f"target = {target!r}: expected an agreement rate with the full member in (0, 1]")
        if self.early_exit is None:
            # Settings edited in memory since the engine started count (no classifier then).
            early_exit = EarlyExit.from_config(self.config)
        else:
            early_exit = self.early_exit
        return early_exit.rule if target is None else early_exit.for_target(target)

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

    def draft_candidates(self, verifier: int, speculative: bool | int | str) -> list[list[int]]:
        """Chains a speculative request may use: the one asked for and, for "cascade", each
        smaller member drafting alone as well (the draft policy picks per round)."""
        chain = self.draft_chain(verifier, speculative)
        if speculative != "cascade" or len(chain) == 2:
            return [chain]
        return [[e, verifier] for e in chain[:-1]] + [chain]

    # The loop.

    def start(self) -> None:
        """Run the step loop (`run`) on a thread of its own."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self.run, name="familial-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """The step loop on the calling thread, until another thread calls `stop`.

        On CPU, step on the thread that loaded the model when there is one to spare (the engine
        process does): each thread that runs intra-op work keeps a team of OpenMP threads, and
        with two teams in a process, more threads than cores, GNU OpenMP stops letting them spin
        between operations, so each of a step's hundreds of parallel regions waits for its
        threads to wake (a 48-token prompt at hidden 512 on two threads: 30 ms a step, 18 ms
        with one team)."""
        self._running = True
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self.scheduler.has_work():
                        self._wake.wait()
                    if self._stopping:
                        return
                with self._drive:
                    self._step()
                if self.after_step is not None:
                    self.after_step()
        finally:
            self._running = False

    def run_with(self, work):
        """Run `work()` on a new thread and the step loop (`run`) on this one until `work` ends;
        return what it returned (raise what it raised). How the engine process and `familial
        generate` step on the thread that loaded the model while another feeds and reads it."""
        outcome = []

        def beside() -> None:
            try:
                outcome.append(work())
            except BaseException as error:  # noqa: BLE001 - raised again on this thread
                outcome.append(error)
            finally:
                self.stop()

        self._stopping = False
        thread = threading.Thread(target=beside, name="familial-work", daemon=True)
        thread.start()
        try:
            self.run()
        finally:
            self.stop()
        thread.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def stop(self) -> None:
        """End the step loop (after its current step) and cancel what is left."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        # A loop `run` on another thread may be mid-step: its step ends before the cancelling.
        with self._drive, self._wake:
            for sequence in list(self.scheduler.waiting) + list(self.scheduler.running.values()):
                self._finish(sequence, "cancelled")
            self.scheduler.waiting.clear()

    def _step(self) -> None:
        """The scheduler's plan for this step, run: the packed call, then the speculative round."""
        plan = self._schedule()
        if plan.packed:
            self._isolated(plan.packed, self._advance)
        if plan.speculating:
            self._isolated(plan.speculating, self._speculate)

    def _schedule(self) -> SchedulerOutput:
        with self._wake:
            plan = self.scheduler.schedule()
            for sequence in plan.cancelled:
                self._finish(sequence, "cancelled")
        for sequence in plan.admitted:
            if sequence.params.repetition_penalty != 1.0:
                self.seen[sequence.slot] = False
                self.seen[sequence.slot, sequence.prompt] = True
        return plan

    def _isolated(self, sequences: list[_Sequence], work) -> None:
        """Run `work` on the sequences; if it fails, again one by one, ending only those that
        fail alone (work changes no sequence before its batched part has succeeded)."""
        try:
            work(sequences)
        except Exception as error:  # noqa: BLE001 - reported to the request, not swallowed
            if len(sequences) == 1:
                self._fail(sequences[0], error)
                return
            for sequence in sequences:
                if not sequence.handle.done:
                    self._isolated([sequence], work)

    def _row(self, sequence: _Sequence) -> Row:
        adaptive, speculation = sequence.adaptive, sequence.speculation
        if adaptive is not None:
            last = not sequence.prefilling or sequence.length + sequence.chunk == len(sequence.prompt)
            classifier = self.early_exit.classifier if self.early_exit is not None else None
            info = Adaptive(adaptive.rule, adaptive.cap(), dict(adaptive.branch_from),
                            None if adaptive.pending is None else list(adaptive.pending), classifier, last)
            # A prompt runs every layer (its KV exact); its branches' KV is filled lazily.
            return Row(sequence.slot, sequence.length, sequence.member, length=sequence.chunk, logits=last,
                       adaptive=info, full_kv=sequence.prefilling)
        if sequence.prefilling:
            last = sequence.length + sequence.chunk == len(sequence.prompt)
            # Prompt KV for the drafters' branches when speculative.
            extra = frozenset(speculation.filled) if speculation else frozenset()
            return Row(sequence.slot, sequence.length, sequence.member, length=sequence.chunk, logits=last,
                       extra_branches=extra)
        extra = frozenset(speculation.waiting.chain[:-1]) if sequence.behind is not None else frozenset()
        return Row(sequence.slot, sequence.length, sequence.member, extra_branches=extra)

    def _inputs(self, sequence: _Sequence) -> list[int]:
        if sequence.prefilling:
            return sequence.prompt[sequence.length:sequence.length + sequence.chunk]
        return [sequence.pending]

    def _catch_up(self, sequence: _Sequence) -> tuple[Row, list[int]]:
        """A row writing the drafters' KV of positions behind..length-1 (through the trunk up to
        the deepest drafter and every drafter's branch), and its tokens."""
        drafters = sequence.speculation.waiting.chain[:-1]
        row = Row(sequence.slot, sequence.behind, drafters[-1], length=sequence.length - sequence.behind,
                  logits=False, extra_branches=frozenset(drafters[:-1]))
        return row, sequence.tokens()[sequence.behind:sequence.length]

    def _advance(self, sequences: list[_Sequence]) -> None:
        """One packed call for these sequences, then their next tokens."""
        started = time.perf_counter()
        rows = [self._row(s) for s in sequences]
        inputs = [t for s in sequences for t in self._inputs(s)]
        for sequence in sequences:
            if sequence.behind is not None:
                row, tokens = self._catch_up(sequence)
                rows.append(row)
                inputs += tokens
        outputs = self.runner.forward(rows, tokens=inputs)[:len(sequences)]
        choosing = [i for i, out in enumerate(outputs) if out.logits is not None]
        chosen = []
        if choosing:
            logits = torch.cat([outputs[i].logits[-1:] for i in choosing])
            chosen = self._choose(logits, [self._draw(sequences[i]) for i in choosing]).tolist()
        exits = {s.member for s in sequences}
        if len(rows) == len(sequences) and all(s.chunk == 1 and not s.prefilling and s.adaptive is None
                                               for s in sequences) and len(exits) == 1:
            # A decoding step's cost per row (the call and the token choice), for the draft policy.
            self.costs.record(("step", exits.pop()), time.perf_counter() - started, len(rows))
        tokens = dict(zip(choosing, chosen))
        for i, sequence in enumerate(sequences):
            self._guard(sequence, self._commit, sequence, tokens.get(i), outputs[i].exit, outputs[i].branches)

    def _commit(self, sequence: _Sequence, token: int | None, exit_layer: int | None,
                branches: set[int] = frozenset()) -> None:
        speculation, adaptive = sequence.speculation, sequence.adaptive
        if adaptive is not None:
            last = sequence.length + sequence.chunk - 1
            if sequence.prefilling:
                adaptive.advance(last, adaptive.member, branches)
            else:
                adaptive.advance(last, exit_layer, branches)
        if sequence.prefilling:
            sequence.length += sequence.chunk
            filled = list(speculation.filled) if speculation else []
        else:
            sequence.length += 1
            filled = speculation.waiting.chain[:-1] if sequence.behind is not None else []
        for e in filled:
            speculation.filled[e] = sequence.length
        if token is not None:
            self._accept(sequence, token, exit_layer)

    def _speculate(self, sequences: list[_Sequence]) -> None:
        """One batched draft-and-verify round for these sequences."""
        proposals = []
        for s in sequences:
            limit = min(s.params.max_new_tokens - len(s.generated), self.max_seq_len - s.length - 1)
            proposals.append(Proposal(s.slot, s.length, s.pending, s.speculation.plan, limit, s.params,
                                      s.seed, len(s.prompt) + len(s.generated)))
        outcomes = self.speculator.round(proposals)
        for sequence, outcome in zip(sequences, outcomes):
            self._guard(sequence, self._commit_round, sequence, outcome)

    def _commit_round(self, sequence: _Sequence, outcome) -> None:
        speculation = sequence.speculation
        chain = speculation.plan.chain
        for level, (drafter, verifier) in enumerate(zip(chain, chain[1:])):
            speculation.policy.record(drafter, verifier, outcome.accepted[level], outcome.compared[level])
        sequence.handle.drafted += outcome.drafted[-1]
        sequence.handle.accepted += outcome.accepted[-1]
        for token in outcome.tokens:
            if sequence.handle.done:
                break
            sequence.length += 1
            for e in chain[:-1]:
                speculation.filled[e] = sequence.length
            self._accept(sequence, token, sequence.member)

    def _choose(self, logits: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
        return choose(logits, draws, self.seen)

    def _draw(self, sequence: _Sequence) -> Draw:
        return Draw(sequence.params, sequence.seed, len(sequence.prompt) + len(sequence.generated), sequence.slot)

    def _guard(self, sequence: _Sequence, work, *args) -> None:
        """Per-sequence work after a batched call: a failure ends this sequence alone."""
        try:
            work(*args)
        except Exception as error:  # noqa: BLE001 - reported to the request, not swallowed
            self._fail(sequence, error)

    def _accept(self, sequence: _Sequence, token: int, exit_layer: int) -> None:
        """Commit one token: stream it, and finish the request on eos, stop string or length."""
        if not 0 <= token < self.config.vocab_size:
            raise RuntimeError(f"token {token} chosen outside the vocabulary [0, {self.config.vocab_size})")
        if sequence.adaptive:
            sequence.adaptive.record(exit_layer)
        sequence.generated.append(token)
        sequence.pending = token
        if sequence.params.repetition_penalty != 1.0:
            self.seen[sequence.slot, token] = True
        event = self.outputs.event(sequence, token, exit_layer)
        with self._wake:
            sequence.handle._put(event)
            if event.finished:
                self.scheduler.release(sequence)

    def _fail(self, sequence: _Sequence, error: Exception) -> None:
        with self._wake:
            if not sequence.handle.done:
                self._finish(sequence, "error", f"{type(error).__name__}: {error}")

    def _finish(self, sequence: _Sequence, reason: str, error: str | None = None) -> None:
        """End a request with an event carrying no token (called holding self._wake)."""
        sequence.handle._put(TokenEvent(None, "", None, True, reason, error))
        self.scheduler.release(sequence)
