"""A KV cache of preallocated per-slot buffers for continuous batching.

Every layer (trunk and branch, keyed by `DecoderLayer.cache_name`) gets a buffer
(slots, kv_heads, max_len, head_dim). A sequence owns one slot and its tokens sit left-aligned
at positions 0..n-1. The cache does not track lengths: the caller says where new keys go
(`starts`) and builds the mask, so rolling back rejected speculative tokens in every layer is
just writing the next tokens over them, and a sequence leaving frees its slot for the next.
"""

from __future__ import annotations

import torch

from familial.config import FamilyConfig


class SlotCache:
    def __init__(self, config: FamilyConfig, num_slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.config, self.num_slots, self.max_len = config, num_slots, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def buffers(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Allocated on first use, so branches a deployment never runs cost no memory.
        if layer not in self.keys:
            shape = (self.num_slots, self.config.num_key_value_heads, self.max_len, self.config.head_dim)
            self.keys[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.values[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self.keys[layer], self.values[layer]

    def view(self, slots: list[int], starts: list[int], length: int) -> "CacheView":
        """A KVStore writing `length` new positions per row at `starts` of `slots`."""
        end = max(starts) + length
        if end > self.max_len:
            raise ValueError(f"sequence needs {end} positions but the cache holds {self.max_len} "
                             f"(raise max_seq_len)")
        return CacheView(self, slots, starts, length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


class CacheView:
    """The rows of one batched call: implements the model's KVStore protocol."""

    def __init__(self, cache: SlotCache, slots: list[int], starts: list[int], length: int) -> None:
        self.cache, self.slots, self.starts, self.length = cache, slots, starts, length
        self.kv_length = max(starts) + length
        device = cache.device
        self.slot_index = torch.tensor(slots, dtype=torch.long, device=device)
        offsets = torch.arange(length, device=device)
        self.positions = torch.tensor(starts, dtype=torch.long, device=device)[:, None] + offsets
        # Consecutive slots read their keys as a slice (no copy), as at batch size 1.
        self.contiguous = slots == list(range(slots[0], slots[0] + len(slots)))

    def rows(self, index: list[int]) -> "CacheView":
        return CacheView(self.cache, [self.slots[i] for i in index], [self.starts[i] for i in index],
                         self.length)

    def update(self, layer: str, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.buffers(layer)
        if self.contiguous and len(set(self.starts)) == 1:
            rows = slice(self.slots[0], self.slots[0] + len(self.slots))
            start = self.starts[0]
            keys[rows, :, start:start + self.length] = key
            values[rows, :, start:start + self.length] = value
            return keys[rows, :, :self.kv_length], values[rows, :, :self.kv_length]
        # (B, kv_heads, T, D) -> (B, T, kv_heads, D): advanced indices come first.
        keys[self.slot_index[:, None], :, self.positions] = key.transpose(1, 2)
        values[self.slot_index[:, None], :, self.positions] = value.transpose(1, 2)
        if self.contiguous:
            rows = slice(self.slots[0], self.slots[0] + len(self.slots))
            return keys[rows, :, :self.kv_length], values[rows, :, :self.kv_length]
        return (keys[:, :, :self.kv_length].index_select(0, self.slot_index),
                values[:, :, :self.kv_length].index_select(0, self.slot_index))

    def mask(self) -> torch.Tensor | None:
        """Boolean (B, 1, T, kv_length): query t of a row sees its keys up to starts + t.

        None when every row starts at the same position: the model's own causal handling
        is then exact and lets attention use its fast path.
        """
        if len(set(self.starts)) == 1:
            return None
        keys = torch.arange(self.kv_length, device=self.cache.device)
        return (keys[None, None, :] <= self.positions[:, :, None])[:, None]
