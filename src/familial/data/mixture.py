"""Weighted mixtures of row sources, e.g. SFT stage II: domain data plus replayed general data.

The interleaving is a deterministic schedule, not a random draw: row `i` goes to the
source furthest behind its quota (`weight * (i + 1) - rows_taken`), so after any number
of rows every source is within one row of its exact share. A fixed ratio then holds in
every batch, not only on average, and the state is just the row counts per source plus
each source's own state (which does its own seeded shuffling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from familial.data.batches import Batches, DocumentRows, Row, RowSource, StreamRows
from familial.data.shards import TokenShards


class MixtureRows:
    """Rows from several sources in proportion to `weights` (normalised to sum to one)."""

    def __init__(self, sources: Sequence[RowSource], weights: Sequence[float],
                 names: Sequence[str] | None = None) -> None:
        if not sources or len(sources) != len(weights):
            raise ValueError(f"a mixture needs one weight per source, got {len(sources)} "
                             f"sources and {len(weights)} weights")
        if any(not weight > 0 for weight in weights):
            raise ValueError(f"mixture weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        self.sources = list(sources)
        self.weights = [float(weight) / total for weight in weights]
        self.names = list(names) if names is not None else [str(i) for i in range(len(sources))]
        self.taken = [0] * len(sources)

    def __iter__(self) -> "MixtureRows":
        return self

    def next_source(self) -> int:
        """Index of the source the next row comes from."""
        rows = sum(self.taken) + 1
        deficits = [weight * rows - taken for weight, taken in zip(self.weights, self.taken)]
        return max(range(len(deficits)), key=lambda k: (deficits[k], -k))

    def __next__(self) -> Row:
        source = self.next_source()
        row = next(self.sources[source])
        self.taken[source] += 1
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "mixture", "weights": self.weights, "names": self.names,
                "taken": list(self.taken),
                "sources": [source.state_dict() for source in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mixture" or len(state.get("sources", [])) != len(self.sources):
            raise ValueError(f"data state is not a mixture of {len(self.sources)} sources "
                             f"({self.names}); did the data configuration change?")
        if [round(w, 9) for w in state["weights"]] != [round(w, 9) for w in self.weights]:
            raise ValueError(f"mixture weights changed since the checkpoint: saved "
                             f"{state['weights']}, now {self.weights}")
        for source, source_state in zip(self.sources, state["sources"]):
            source.load_state_dict(source_state)
        self.taken = [int(count) for count in state["taken"]]


def mixture_batches(sources: Sequence[TokenShards], weights: Sequence[float], batch_size: int,
                    seq_len: int, seed: int = 0, conversations: bool = False, rank: int = 0,
                    world_size: int = 1) -> Batches:
    """Batches mixing shard directories by weight: packed windows, or whole conversations."""
    rows = [DocumentRows(shards, seq_len, seed + index) if conversations
            else StreamRows(shards, seq_len, seed + index)
            for index, shards in enumerate(sources)]
    names = [str(shards.path) for shards in sources]
    return Batches(MixtureRows(rows, weights, names), batch_size, rank, world_size)
