"""Tokenising chunks of documents in this process or in N worker processes, in input order.

Every chunk is encoded by the same function wherever it runs, and results are taken back
in the order the chunks were read, so the token stream does not depend on the number of
processes. Workers are started with `spawn` (nothing of this process, such as a tokenizer
that has already used its threads, is inherited) and each encodes on one thread: N
workers use N cores. At most a few chunks per worker are in flight, so memory stays
bounded however large the inputs.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from familial.data import chat
from familial.data.readers import Chunk
from familial.data.tokenize import tokenizer_from_json

IN_FLIGHT_PER_WORKER = 4


class WorkerDied(ChildProcessError):
    """A worker process ended without an answer (killed, or out of memory): the run cannot
    finish. The machine's fault, not the input's, so not a ValueError; as an OSError without
    a file name, the command line still reports it in one line."""


@dataclass(frozen=True)
class EncodeSpec:
    """Everything a worker needs to encode chunks exactly as this process would."""

    tokenizer_json: bytes
    eos_token_id: int | None
    field: str                 # the JSONL field holding the text
    dtype: str                 # of the token ids handed back (the shards' dtype)
    template: str | None = None
    end_of_turn: str = chat.END_OF_TURN
    special_tokens: dict[str, str] = field(default_factory=dict)


@dataclass
class Encoded:
    """A chunk's documents: all token ids back to back, each document's length, the loss
    mask when documents carry one, and how many blank documents were left out."""

    tokens: np.ndarray
    lengths: np.ndarray
    loss_mask: np.ndarray | None
    blank: int


class Encoder:
    def __init__(self, spec: EncodeSpec) -> None:
        self.spec = spec
        self.tokenizer = tokenizer_from_json(spec.tokenizer_json, "tokenizer")
        self.eos = [] if spec.eos_token_id is None else [spec.eos_token_id]
        # Same ids without the character offsets nobody here reads: about 1.5x faster.
        self.encode_batch = getattr(self.tokenizer, "encode_batch_fast",
                                    self.tokenizer.encode_batch)

    def __call__(self, chunk: Chunk) -> Encoded:
        if chunk.kind in ("texts", "jsonl"):
            return self._texts(chunk_texts(chunk, self.spec.field))
        return self._conversations(_records(chunk), chunk.where)

    def _texts(self, texts: list[str]) -> Encoded:
        kept = [text for text in texts if text.strip()]
        ids = [encoding.ids + self.eos
               for encoding in self.encode_batch(kept, add_special_tokens=False)]
        return self._pack(ids, None, len(texts) - len(kept))

    def _conversations(self, records: list[tuple[int, object]], where: str) -> Encoded:
        ids, masks = [], []
        for number, record in records:
            located = f"{where}:{number}"
            messages = record.get("messages") if isinstance(record, dict) else None
            document = chat.encode_chat(
                self.tokenizer, chat.validate_messages(messages, located), self.spec.template,
                self.spec.end_of_turn, self.spec.special_tokens, where=located)
            ids.append(document.ids)
            masks.append(document.loss_mask)
        return self._pack(ids, masks, 0)

    def _pack(self, ids: list, masks: list | None, blank: int) -> Encoded:
        """Lists of ids (texts) or arrays of ids and masks (conversations), back to back."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        keep = lengths > 0
        if masks is None:
            tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.spec.dtype,
                                 count=int(lengths.sum()))
            mask = None
        else:
            tokens = np.concatenate([np.zeros(0, np.int64), *ids]).astype(self.spec.dtype)
            mask = np.concatenate([np.zeros(0, np.uint8), *masks]).astype(np.uint8)
        return Encoded(tokens, lengths[keep], mask, blank + int((~keep).sum()))


def chunk_texts(chunk: Chunk, field: str) -> list[str]:
    """The documents of a `texts` or `jsonl` chunk (JSONL: each line's `field`)."""
    if chunk.kind == "texts":
        return chunk.texts
    return [_text(record, field, chunk.where, number) for number, record in _records(chunk)]


def _records(chunk: Chunk) -> list[tuple[int, object]]:
    """(line number, object) for every non-blank line of a block of JSONL."""
    try:
        text = chunk.lines.decode("utf-8")
    except UnicodeDecodeError as error:
        line = chunk.first_line + chunk.lines.count(b"\n", 0, error.start)
        raise ValueError(f"{chunk.where}:{line}: not UTF-8 ({error.reason})") from None
    records = []
    for number, line in enumerate(text.split("\n"), start=chunk.first_line):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{chunk.where}:{number}: not valid JSON ({error.msg})") from None
    return records


def _text(record: object, field: str, where: str, number: int) -> str:
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{where}:{number}: expected an object with a string '{field}' "
                         f"field, got {json.dumps(record)[:80]}")
    return text


def encode_chunks(spec: EncodeSpec, chunks: Iterable[Chunk],
                  workers: int = 1) -> Iterator[tuple[Chunk, Encoded]]:
    """(chunk, its encoding) for every chunk, in order, encoded by `workers` processes
    (1: here, where `tokenizers` may use its own threads)."""
    if workers == 1:
        encoder = Encoder(spec)
        for chunk in chunks:
            yield chunk, encoder(chunk)
        return
    pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_start_worker,
                               initargs=(spec,))
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append((chunk, pool.submit(_encode, chunk)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    except BrokenProcessPool:
        raise WorkerDied("a tokenising worker process died (killed, or out of memory?); "
                         "nothing was written") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one: a fresh process (as spawn starts) imports this module
    once, and each worker is a fork of it rather than another interpreter start."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


_worker: Encoder | None = None


def _start_worker(spec: EncodeSpec) -> None:
    global _worker
    # One thread per worker: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = Encoder(spec)


def _encode(chunk: Chunk) -> Encoded:
    return _worker(chunk)
