"""The scheduler: which requests run this step, on which cache slots, with how many tokens.

As vLLM v1's scheduler, it owns the queue and the running set and returns a plan
(`SchedulerOutput`) without touching the model; the engine (familial.infer.engine) runs the
plan through the runner and turns the outputs into tokens and events.

Admission: waiting requests take the lowest free slots, shortest prompt first, so running
sequences stay packed at the front of the cache and neighbouring slots hold sequences of
similar lengths (decode attention reads each run of slots up to its longest:
familial.infer.cache). Prefill chunking: decoding sequences come first, then prompt chunks up
to `max_prefill_tokens` in all, so several prompts prefill together and a long prompt is cut
into chunks. Speculative sequences whose draft policy plans a round take it apart from the
packed call (familial.infer.speculative).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from familial.infer.draft_policy import CallCosts
from familial.infer.requests import QueueFull


@dataclass
class SchedulerOutput:
    """One step's plan (the sequences' `chunk` and `behind` say what each one runs)."""

    # sequences in the packed call: decoding ones first, in slot order, then prompt chunks.
    packed: list = field(default_factory=list)
    # sequences taking one draft-and-verify round.
    speculating: list = field(default_factory=list)
    # sequences that took a slot this step.
    admitted: list = field(default_factory=list)
    # sequences whose requests were cancelled, out of the queue and their slots (the engine ends them).
    cancelled: list = field(default_factory=list)


class Scheduler:
    """The waiting queue, the running sequences by slot, and the free slots. Its caller holds
    the engine's lock around `add`, `schedule` and `release`."""

    def __init__(self, max_batch_size: int, max_queue: int, max_prefill_tokens: int, costs: CallCosts) -> None:
        self.max_queue, self.max_prefill_tokens, self.costs = max_queue, max_prefill_tokens, costs
        self.waiting: deque = deque()
        self.running: dict[int, object] = {}
        self.free = list(range(max_batch_size))

    def add(self, sequence, force: bool = False) -> None:
        """Queue a sequence; QueueFull when `max_queue` wait already (unless forced)."""
        if len(self.waiting) >= self.max_queue and not force:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue {self.max_queue})")
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def release(self, sequence) -> None:
        """Free a finished sequence's slot (nothing if it holds none)."""
        if self.running.get(sequence.slot) is sequence:
            del self.running[sequence.slot]
            self.free.append(sequence.slot)

    def schedule(self) -> SchedulerOutput:
        """Drop cancelled requests, admit waiting ones, and plan the step."""
        output = SchedulerOutput(cancelled=self._drop_cancelled())
        output.admitted = self._admit()
        self._plan(output)
        return output

    def _drop_cancelled(self) -> list:
        cancelled = [s for s in self.waiting if s.handle.cancelled]
        for sequence in cancelled:
            self.waiting.remove(sequence)
        running = [s for s in self.running.values() if s.handle.cancelled]
        for sequence in running:
            self.release(sequence)
        return cancelled + running

    def _admit(self) -> list:
        admitted = [self.waiting.popleft() for _ in range(min(len(self.free), len(self.waiting)))]
        self.free.sort()
        admitted.sort(key=lambda s: len(s.prompt))
        for sequence in admitted:
            sequence.slot = self.free.pop(0)
            self.running[sequence.slot] = sequence
        return admitted

    def _plan(self, output: SchedulerOutput) -> None:
        budget = self.max_prefill_tokens
        for sequence in sorted(self.running.values(), key=lambda s: s.slot):
            if sequence.handle.done:
                continue
            sequence.chunk, sequence.behind = 1, None
            if sequence.prefilling:
                if budget == 0:
                    continue
                sequence.chunk = min(len(sequence.prompt) - sequence.length, budget)
                budget -= sequence.chunk
                output.packed.append(sequence)
            elif self._speculates(sequence):
                output.speculating.append(sequence)
            else:
                output.packed.append(sequence)
        output.packed.sort(key=lambda s: (s.chunk > 1, s.slot))

    def _speculates(self, sequence) -> bool:
        """Whether a decoding sequence takes a speculative round this step (its plan in
        `speculation.plan`)."""
        speculation = sequence.speculation
        if speculation is None:
            return False
        plan = speculation.waiting or speculation.policy.plan(self.costs)
        speculation.waiting = speculation.plan = None
        if plan is None:
            return False
        behind = min(speculation.filled[e] for e in plan.chain[:-1])
        if behind < sequence.length:
            # Plain steps left the drafters' KV behind: fill it in alongside this step's
            # token, and speculate from the next step on.
            speculation.waiting, sequence.behind = plan, behind
            return False
        speculation.plan = plan
        return True
