"""Training rows and batches cut from token shards, deterministic and resumable.

Two row sources, both yielding `(input_ids, labels)` pairs of length `seq_len` where
`labels[t]` is the target for position `t` (already shifted) or -100:

- `StreamRows` (pre-training): the shards' documents are one token stream (documents end
  in EOS); rows are windows of `seq_len + 1` tokens at stride `seq_len`, so every token
  after the first is a target exactly once per epoch. Attention crosses document borders,
  as in GPT-style packed pre-training.
- `DocumentRows` (SFT): whole documents (conversations) packed greedily into rows and the
  rest padded, so no conversation is ever cut in two; `pack=False` puts one conversation
  per row. Right padding under causal attention needs no attention mask: real tokens never
  see the pads, whose labels are -100. A document longer than a row is truncated.

Labels are -100 where the shards' loss mask is 0 (user and system turns of chat data).
Order is a per-epoch permutation seeded by `(seed, epoch)`, so a state of plain integers
(`epoch`, `position`) resumes exactly; `Batches` stacks rows into tensors and, for data
parallel runs, hands each rank its slice of the global batch.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from familial.data.shards import TokenShards

IGNORE_INDEX = -100
Row = tuple[np.ndarray, np.ndarray]


class RowSource(Protocol):
    def __iter__(self) -> "RowSource": ...
    def __next__(self) -> Row: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _labels(targets: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    labels = targets.astype(np.int64)
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return labels


class _EpochOrder:
    """Items 0..count-1 in a seeded per-epoch order, with a resumable (epoch, position)."""

    kind = "order"

    def __init__(self, count: int, seed: int, shuffle: bool, loop: bool) -> None:
        self.count, self.seed, self.shuffle, self.loop = count, seed, shuffle, loop
        self.epoch = self.position = 0
        self._order: np.ndarray | None = None

    def __iter__(self):
        return self

    def _current_order(self) -> np.ndarray:
        if self._order is None:
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
                           if self.shuffle else np.arange(self.count))
        return self._order

    def peek(self) -> int | None:
        """The next item, advancing to the next epoch when this one is used up."""
        if self.position >= self.count:
            if not self.loop:
                return None
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return int(self._current_order()[self.position])

    def take(self) -> int:
        item = self.peek()
        if item is None:
            raise StopIteration
        self.position += 1
        return item

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "epoch": self.epoch, "position": self.position,
                "seed": self.seed, "count": self.count, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("kind", "seed", "count", "shuffle"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"data state does not match this data: '{key}' is "
                                 f"{state.get(key)!r} in the saved state but "
                                 f"{self.state_dict()[key]!r} now (did the shards, seq_len or "
                                 f"seed change since the checkpoint?)")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


class StreamRows(_EpochOrder):
    """Windows of `seq_len + 1` tokens from the concatenated documents."""

    kind = "stream"

    def __init__(self, shards: TokenShards, seq_len: int, seed: int = 0, shuffle: bool = True,
                 loop: bool = True) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.shards, self.seq_len = shards, seq_len
        self.start = int(shards.documents[0])
        windows = (shards.num_tokens - 1) // seq_len
        if windows < 1:
            raise ValueError(f"{shards.path}: {shards.num_tokens} tokens are too few for one "
                             f"row of seq_len {seq_len} (need {seq_len + 1})")
        super().__init__(windows, seed, shuffle, loop)

    def __next__(self) -> Row:
        begin = self.start + self.take() * self.seq_len
        end = begin + self.seq_len + 1
        tokens = np.asarray(self.shards.tokens[begin:end], dtype=np.int64)
        mask = None if self.shards.loss_mask is None else self.shards.loss_mask[begin + 1:end]
        return tokens[:-1], _labels(tokens[1:], mask)


class DocumentRows(_EpochOrder):
    """Whole documents per row, greedily packed (or one per row) and right-padded."""

    kind = "documents"

    def __init__(self, shards: TokenShards, seq_len: int, seed: int = 0, shuffle: bool = True,
                 loop: bool = True, pack: bool = True, pad_token_id: int | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.shards, self.seq_len, self.pack = shards, seq_len, pack
        self.pad_token_id = (pad_token_id if pad_token_id is not None
                             else shards.eos_token_id or 0)
        super().__init__(shards.num_documents, seed, shuffle, loop)

    def __next__(self) -> Row:
        width = self.seq_len + 1
        tokens = np.full(width, self.pad_token_id, dtype=np.int64)
        mask = np.zeros(width, dtype=np.uint8)
        used = 0
        while used < width:
            index = self.peek()
            if index is None:
                break
            length = len(self.shards.document(index))
            if used and (not self.pack or used + length > width):
                break
            self.take()
            take = min(length, width - used)
            tokens[used:used + take] = self.shards.document(index)[:take]
            mask[used:used + take] = self.shards.document_mask(index)[:take]
            used += take
        if used == 0:
            raise StopIteration
        return tokens[:-1], _labels(tokens[1:], mask[1:])


class Batches:
    """Stacks rows into `{"input_ids": (B, T), "labels": (B, T)}` int64 batches.

    Each step draws `batch_size * world_size` rows and keeps this rank's slice, so every
    rank sees the same sequence of global batches and resumes from the same state. When
    the rows run out (`loop=False`, evaluation) the last batch may be smaller.
    """

    def __init__(self, rows: RowSource, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.rows, self.batch_size, self.rank, self.world_size = rows, batch_size, rank, world_size
        self.step = 0

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        drawn: list[Row] = []
        for _ in range(self.batch_size * self.world_size):
            try:
                drawn.append(next(self.rows))
            except StopIteration:
                break
        mine = drawn[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        if not mine:
            raise StopIteration
        self.step += 1
        return {"input_ids": torch.from_numpy(np.stack([row[0] for row in mine])),
                "labels": torch.from_numpy(np.stack([row[1] for row in mine]))}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rows": self.rows.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])
        self.step = int(state["step"])


class PackedBatches(Batches):
    """Pre-training batches: shuffled `seq_len + 1` windows of the token stream."""

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int = 0,
                 shuffle: bool = True, loop: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(StreamRows(shards, seq_len, seed, shuffle, loop), batch_size,
                         rank, world_size)


class ConversationBatches(Batches):
    """SFT batches: whole conversations per row (packed unless `pack=False`), right-padded."""

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int = 0,
                 shuffle: bool = True, loop: bool = True, pack: bool = True,
                 pad_token_id: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(DocumentRows(shards, seq_len, seed, shuffle, loop, pack, pad_token_id),
                         batch_size, rank, world_size)


def eval_batches(shards: TokenShards, batch_size: int, seq_len: int) -> PackedBatches:
    """Every window of held-out shards once, in order: the same numbers on every call."""
    return PackedBatches(shards, batch_size, seq_len, shuffle=False, loop=False)
