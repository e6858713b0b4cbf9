"""The KV cache: one slot per running sequence, written in place and never copied.

Every layer (trunk and branch, keyed by `DecoderLayer.cache_name`) gets a buffer
(slots, kv_heads, max_len, head_dim). A sequence owns one slot and its tokens sit at positions
0..n-1 of it. The cache does not track lengths: each call says where its new keys go, so
rolling back rejected speculative tokens in every layer is just writing the next tokens over
them, and a sequence leaving frees its slot for the next.

A call is a packed batch (`CacheBatch`): rows of different lengths laid end to end as one
sequence of N tokens, so projections and MLPs run once over all of them. Attention then runs
per kind of row, reading the cache in place:
- single-token rows (decoding) attend together over the slice of slots they span (their
  queries are scattered into that slice, not the keys gathered out of it), each row masked to
  its own length; the slice is cut into runs where lengths differ enough that reading the
  short rows' padding costs more than another call (`decode_runs`); with grouped-query
  attention the query heads of one KV head ride as extra query positions, so no key is repeated;
- any other row (a prompt chunk, speculative verification, a slot's second row) attends over
  its own slot's prefix, with the kernel's causal fast path when it starts at position 0.
On CPU in float32 the runner attends every row of a call in one native call per layer instead
(familial.infer.native), where each row has a slot of its own; this code serves the rest
(bfloat16, other devices, a slot's second row, a build without the native kernels).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from familial.config import FamilyConfig
from familial.model import causal_mask


class SlotCache:
    def __init__(self, config: FamilyConfig, num_slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.config, self.num_slots, self.max_len = config, num_slots, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        # Adaptive exit: each position's trunk state entering an early exit (familial.infer.runner).
        self.exit_states: dict[int, torch.Tensor] = {}

    def buffers(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Allocated on first use, so branches a deployment never runs cost no memory.
        if layer not in self.keys:
            shape = (self.num_slots, self.config.num_key_value_heads, self.max_len, self.config.head_dim)
            self.keys[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.values[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self.keys[layer], self.values[layer]

    def states(self, exit_layer: int) -> torch.Tensor:
        """(slots, max_len, hidden) trunk states entering `exit_layer`, allocated on first use."""
        if exit_layer not in self.exit_states:
            self.exit_states[exit_layer] = torch.zeros(self.num_slots, self.max_len, self.config.hidden_size,
                                                       dtype=self.dtype, device=self.device)
        return self.exit_states[exit_layer]

    def batch(self, slots: list[int], starts: list[int], lengths: list[int]) -> CacheBatch:
        """A KVStore for rows writing `lengths[i]` positions from `starts[i]` of `slots[i]`."""
        for slot, start, length in zip(slots, starts, lengths):
            if start + length > self.max_len:
                raise ValueError(f"sequence needs {start + length} positions but the cache holds "
                                 f"{self.max_len} (raise max_seq_len)")
            if not 0 <= slot < self.num_slots:
                raise ValueError(f"slot {slot} is not in [0, {self.num_slots})")
        return CacheBatch(self, slots, starts, lengths)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (*self.keys.values(), *self.values.values(), *self.exit_states.values()))


class CacheBatch:
    """The rows of one packed call: implements the model's KVStore protocol."""

    def __init__(self, cache: SlotCache, slots: list[int], starts: list[int], lengths: list[int]) -> None:
        self.cache, self.slots, self.starts, self.lengths = cache, slots, starts, lengths
        device = cache.device
        self.offsets = [0]
        for length in lengths:
            self.offsets.append(self.offsets[-1] + length)
        self.tokens = self.offsets[-1]
        # One row, or a run of single-token rows at one position in consecutive slots, is a
        # plain slice of the cache: written by slicing, not scattering.
        self.slice = None
        if len(slots) == 1:
            self.slice = (slice(slots[0], slots[0] + 1), slice(starts[0], starts[0] + lengths[0]))
        elif slots and max(lengths) == 1 and len(set(starts)) == 1 and slots == list(range(slots[0], slots[0] + len(slots))):
            self.slice = (slice(slots[0], slots[0] + len(slots)), starts[0])
        self.slot_index = None
        if not self.slice:
            slot_of = [slot for slot, length in zip(slots, lengths) for _ in range(length)]
            self.slot_index = torch.tensor(slot_of, dtype=torch.long, device=device)
        # Single-token rows attend together, one per slot (a slot's second row, such as a
        # speculative sequence's KV catch-up beside its decoding step, attends on its own).
        decode, taken = [], set()
        for i, (slot, length) in enumerate(zip(slots, lengths)):
            if length == 1 and slot not in taken:
                decode.append(i)
                taken.add(slot)
        self._plan_decode(decode)
        single = set(decode)
        self.spans = [i for i in range(len(slots)) if i not in single]

    @functools.cached_property
    def span_masks(self) -> dict[int, torch.Tensor | None]:
        """Causal masks of rows that start after cached positions (built once, for every layer
        of a call attending on torch's kernels)."""
        return {i: causal_mask(self.lengths[i], self.starts[i] + self.lengths[i], self.cache.device)
                if self.starts[i] else None for i in self.spans}

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """(N,) each token's position in its slot."""
        return torch.tensor([p for start, length in zip(self.starts, self.lengths) for p in range(start, start + length)],
                            dtype=torch.long, device=self.cache.device)

    @functools.cached_property
    def row_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(slots, starts, lengths) as int64 tensors when every row has a slot of its own (rows
        of one call can then attend in parallel: none reads keys another writes), else None."""
        if len(set(self.slots)) < len(self.slots):
            return None
        device = self.cache.device
        return tuple(torch.tensor(values, dtype=torch.long, device=device)
                     for values in (self.slots, self.starts, self.lengths))

    def rotary(self, table: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This call's (cos, sin), each (1, N, D), from `table`'s (1, max_len, D) over every
        position of the cache: a view of it when the call is a slice of the cache."""
        if self.slice is None:
            return tuple(t.index_select(1, self.positions) for t in table)
        positions = self.slice[1]
        if isinstance(positions, slice):
            return tuple(t[:, positions] for t in table)
        return tuple(t[:, positions:positions + 1].expand(1, self.tokens, t.shape[-1]) for t in table)

    def _plan_decode(self, rows: list[int]) -> None:
        self.decode_rows = rows
        # Row i's token sits at offset i when every single-token row comes first.
        tokens = [self.offsets[i] for i in rows]
        self.decode_prefix = tokens == list(range(len(rows)))
        self.decode_tokens = None if self.decode_prefix else torch.tensor(tokens, dtype=torch.long,
                                                                          device=self.cache.device)

    @functools.cached_property
    def decode_groups(self) -> list[DecodeGroup]:
        """Single-token rows attend in a few calls, each over a run of slots lo..hi-1. Planned
        on first use: a runner on the native kernel (familial.infer.native) never needs them."""
        rows = self.decode_rows
        slots = [self.slots[i] for i in rows]
        visible = [self.starts[i] + 1 for i in rows]
        ordered = all(a < b for a, b in zip(slots, slots[1:]))
        runs = decode_runs(slots, visible) if ordered else [(0, len(rows))]
        return [self._decode_group(first, end, slots, visible) for first, end in runs]

    def _decode_group(self, first: int, end: int, slots: list[int], visible: list[int]) -> DecodeGroup:
        """Decode rows first..end-1 (in call order) as one attention call over the slots they span."""
        device = self.cache.device
        slots, visible = slots[first:end], visible[first:end]
        lo, hi = min(slots), max(slots) + 1
        seen = [1] * (hi - lo)
        for slot, length in zip(slots, visible):
            seen[slot - lo] = length
        kv_length = max(seen)
        slot_rows = None if slots == list(range(lo, hi)) else torch.tensor(
            [s - lo for s in slots], dtype=torch.long, device=device)
        mask = None
        # Slots between the rows' own see position 0 only (their output is never read). An
        # additive mask: SDPA's CPU kernel runs it as fast as no mask, a boolean one ~10% slower.
        if min(seen) < kv_length:
            keys = torch.arange(kv_length, device=device)
            hidden = keys[None, :] >= torch.tensor(seen, device=device)[:, None]
            mask = torch.zeros(hidden.shape, dtype=self.cache.dtype, device=device).masked_fill_(
                hidden, -float("inf"))[:, None, None, :]
        return DecodeGroup(first, end, lo, hi - lo, kv_length, slot_rows, mask)

    def rows(self, index: list[int]) -> CacheBatch:
        """The same call restricted to rows `index` (rows leaving at an exit)."""
        return CacheBatch(self.cache, [self.slots[i] for i in index], [self.starts[i] for i in index],
                          [self.lengths[i] for i in index])

    def write(self, layer: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store (1, kv_heads, N, D) keys/values of this call's tokens at their positions."""
        keys, values = self.cache.buffers(layer)
        if self.slice is not None:
            slots, positions = self.slice
            # (1, kv_heads, N, D) -> (rows, kv_heads, D) for a run of single tokens at one position.
            key, value = (key, value) if isinstance(positions, slice) else (key[0].transpose(0, 1),
                                                                           value[0].transpose(0, 1))
            keys[slots, :, positions] = key
            values[slots, :, positions] = value
            return
        # (kv_heads, N, D) -> (N, kv_heads, D): advanced indices come first.
        keys[self.slot_index, :, self.positions] = key[0].transpose(0, 1)
        values[self.slot_index, :, self.positions] = value[0].transpose(0, 1)

    def attend(self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (1, heads, N, D) of this call's tokens -> attention output (1, heads, N, D)."""
        self.write(layer, k, v)
        keys, values = self.cache.buffers(layer)
        if not self.spans and self.decode_prefix:
            return self._attend_decode(q, keys, values)[None].transpose(1, 2)
        if not self.decode_rows and len(self.spans) == 1:
            return self._attend_span(self.spans[0], q, keys, values)
        # (1, N, heads, D) underneath, so the caller's transpose back is free.
        out = q.new_empty(1, self.tokens, q.shape[1], q.shape[3])
        if self.decode_rows:
            result = self._attend_decode(q, keys, values)
            if self.decode_prefix:
                out[0, :len(self.decode_rows)] = result
            else:
                out[0].index_copy_(0, self.decode_tokens, result)
        for i in self.spans:
            out[0, self.offsets[i]:self.offsets[i + 1]] = self._attend_span(i, q, keys, values)[0].transpose(0, 1)
        return out.transpose(1, 2)

    def _attend_span(self, i: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Row i's tokens over its own slot: (1, heads, T, D)."""
        slot, end = self.slots[i], self.starts[i] + self.lengths[i]
        k_row, v_row = keys[slot:slot + 1, :, :end], values[slot:slot + 1, :, :end]
        mask = self.span_masks[i]
        return F.scaled_dot_product_attention(q[:, :, self.offsets[i]:self.offsets[i + 1]], k_row, v_row,
                                              attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=q.shape[1] != k_row.shape[1])

    def _attend_decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The single-token rows over their slots: (rows, heads, D)."""
        count = len(self.decode_rows)
        kv_heads, dim = keys.shape[1], keys.shape[3]
        if self.decode_prefix:
            query = q[0, :, :count].transpose(0, 1)
        else:
            query = q[0].index_select(1, self.decode_tokens).transpose(0, 1)
        # (rows, heads, D) -> (rows, kv_heads, heads per KV head, D): the group rides as positions.
        query = query.reshape(count, kv_heads, -1, dim)
        results = []
        for group in self.decode_groups:
            part = query if len(self.decode_groups) == 1 else query[group.first:group.end]
            if group.slot_rows is not None:
                part = part.new_zeros(group.span, *part.shape[1:]).index_copy_(0, group.slot_rows, part)
            span = slice(group.lo, group.lo + group.span)
            result = F.scaled_dot_product_attention(part, keys[span, :, :group.kv_length],
                                                    values[span, :, :group.kv_length], attn_mask=group.mask)
            results.append(result if group.slot_rows is None else result.index_select(0, group.slot_rows))
        result = results[0] if len(results) == 1 else torch.cat(results)
        return result.reshape(count, -1, dim)


@dataclass
class DecodeGroup:
    """Decode rows first..end-1 (in call order), attending in one call over `span` slots from
    `lo`, keys 0..kv_length-1; slot_rows: each row's slot within the span, where rows do not
    fill it (None: row i is slot lo + i); mask: each slot's visible keys, where they differ."""

    first: int
    end: int
    lo: int
    span: int
    kv_length: int
    slot_rows: torch.Tensor | None
    mask: torch.Tensor | None


# What one more attention call costs, in slot positions read (about 10 us of dispatch against
# ~0.08 us per key and value of a slot position, on one CPU thread).
CALL_POSITIONS = 128


def decode_runs(slots: list[int], visible: list[int]) -> list[tuple[int, int]]:
    """Cut decode rows (slots increasing) into runs attending separately: [(first, end)].

    Attention over a slot span reads every slot up to the longest row's length, so rows of
    very different lengths side by side read mostly padding: a run boundary between them saves
    those reads, at the cost of one more call. The cut is the cheapest (dynamic programming over
    the rows, at most a few thousand steps for a full batch).
    """
    n = len(slots)
    best = [0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = 0
        for first in range(end - 1, -1, -1):
            longest = max(longest, visible[first])
            cost = best[first] + CALL_POSITIONS + (slots[end - 1] - slots[first] + 1) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, first
    runs, end = [], n
    while end:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]
