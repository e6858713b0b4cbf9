"""Decode attention over the slot cache, cut into runs of slots whose lengths are alike."""

from __future__ import annotations

import pytest
import torch

from familial.infer.cache import CALL_POSITIONS, SlotCache, decode_runs
from familial.infer.engine import Engine
from familial.infer.sampling import SamplingParams


def test_rows_of_very_different_lengths_attend_in_separate_runs():
    long = 4 * CALL_POSITIONS
    assert decode_runs([0, 1, 2, 3], [5, 6, long, long]) == [(0, 2), (2, 4)]
    # Alike lengths stay in one call: another call costs more than the padding it saves.
    assert decode_runs([0, 1, 2, 3], [50, 52, 60, 61]) == [(0, 4)]
    # A wide gap of free slots between two rows is not read.
    assert decode_runs([0, 30], [long, long]) == [(0, 1), (1, 2)]


@pytest.mark.parametrize("slots, lengths, groups", [
    ([0, 1, 2, 4, 5], [3, 7, 280, 290, 9], 4),   # runs side by side
    ([0, 2, 3, 5], [5, 6, 280, 290], 3),         # a run over a free slot (slot 1)
    ([5, 0, 3, 2], [290, 5, 280, 6], 1),         # rows out of slot order: one call
])
def test_decode_attention_equals_each_row_over_its_own_slot(family, slots, lengths, groups):
    cache = SlotCache(family.config, num_slots=6, max_len=300)
    keys, values = cache.buffers("layer")
    keys.normal_()
    values.normal_()
    batch = cache.batch(slots, [n - 1 for n in lengths], [1] * len(slots))
    assert len(batch.decode_groups) == groups
    heads, dim = family.config.num_attention_heads, family.config.head_dim
    q = torch.randn(1, heads, len(slots), dim)
    k, v = (torch.randn(1, family.config.num_key_value_heads, len(slots), dim) for _ in range(2))
    out = batch.attend("layer", q, k, v)
    for i, (slot, length) in enumerate(zip(slots, lengths)):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, i:i + 1], keys[slot:slot + 1, :, :length], values[slot:slot + 1, :, :length], enable_gqa=True)
        torch.testing.assert_close(out[:, :, i:i + 1], expected)


def test_short_and_long_sequences_decoding_together_equal_one_by_one(family, greedy_reference):
    # Admitted together, shortest prompt first into the lowest slots; the long ones decode in
    # their own run of slots beside the short ones.
    prompts = [list(range(1, 90)), [5, 6], list(range(3, 80)), [7], [9, 10, 11]]
    engine = Engine(family, max_batch_size=5, max_seq_len=128)
    handles = [engine.submit(p, member=5, params=SamplingParams(max_new_tokens=6, greedy=True)) for p in prompts]
    engine.scheduler.schedule()
    assert [s.slot for s in sorted(engine.scheduler.running.values(), key=lambda s: len(s.prompt))] == [0, 1, 2, 3, 4]
    with engine._drive:
        while not all(h.done for h in handles):
            engine._step()
    for handle, prompt in zip(handles, prompts):
        assert [e.token_id for e in handle] == greedy_reference(family, prompt, 5, 6)
