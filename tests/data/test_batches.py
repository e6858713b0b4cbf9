"""Packing rows and batches: shifted labels, masks, padding, determinism and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from familial.data.batches import (IGNORE_INDEX, ConversationBatches, PackedBatches, StreamRows,
                                   eval_batches)
from familial.data.shards import Document, write_shards


@pytest.fixture
def stream(tmp_path):
    documents = [list(range(start, start + 10)) for start in range(0, 100, 10)]
    return write_shards(tmp_path / "s", documents, vocab_size=128, eos_token_id=127)


def test_windows_are_shifted_and_cover_the_stream(stream):
    batches = eval_batches(stream, batch_size=4, seq_len=8)
    seen = list(batches)
    inputs = torch.cat([b["input_ids"] for b in seen])
    labels = torch.cat([b["labels"] for b in seen])
    assert inputs.shape == labels.shape == ((100 - 1) // 8, 8)
    assert inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(labels, inputs + 1)
    assert inputs.flatten().tolist() == list(range(96))
    assert [b["input_ids"].shape[0] for b in seen] == [4, 4, 4]


def test_loss_mask_becomes_ignored_labels(tmp_path):
    shards = write_shards(tmp_path / "s", [Document([1, 2, 3, 4, 5], [0, 0, 1, 1, 0])], vocab_size=8)
    inputs, labels = next(StreamRows(shards, seq_len=4, shuffle=False))
    assert inputs.tolist() == [1, 2, 3, 4]
    assert labels.tolist() == [IGNORE_INDEX, 3, 4, IGNORE_INDEX]


def test_shuffle_is_seeded_and_covers_each_window_once_per_epoch(stream):
    first = [b["input_ids"] for _, b in zip(range(3), PackedBatches(stream, 4, 8, seed=1))]
    again = [b["input_ids"] for _, b in zip(range(3), PackedBatches(stream, 4, 8, seed=1))]
    other = [b["input_ids"] for _, b in zip(range(3), PackedBatches(stream, 4, 8, seed=2))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    starts = sorted(int(row[0]) for batch in first for row in batch)
    assert starts == list(range(0, 96, 8))


def test_resume_continues_with_exactly_the_next_batch(stream):
    reference = PackedBatches(stream, 5, 8, seed=3)
    expected = [next(reference) for _ in range(7)]
    first = PackedBatches(stream, 5, 8, seed=3)
    for _ in range(4):
        next(first)
    state = first.state_dict()
    resumed = PackedBatches(stream, 5, 8, seed=3)
    resumed.load_state_dict(state)
    for want in expected[4:]:
        got = next(resumed)
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["labels"], want["labels"])
    with pytest.raises(ValueError, match="'seed' is 3 in the saved state but 4 now"):
        PackedBatches(stream, 5, 8, seed=4).load_state_dict(state)


def test_ranks_split_the_global_batch(stream):
    whole = next(PackedBatches(stream, 4, 8, seed=0))["input_ids"]
    parts = [next(PackedBatches(stream, 2, 8, seed=0, rank=r, world_size=2))["input_ids"]
             for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_conversations_are_packed_whole_and_padded(tmp_path):
    conversations = [Document([1, 2, 3], [0, 1, 1]), Document([4, 5, 6, 7], [0, 0, 1, 1]),
                     Document([8, 9], [0, 1])]
    shards = write_shards(tmp_path / "c", conversations, vocab_size=16, eos_token_id=15)
    rows = list(ConversationBatches(shards, batch_size=1, seq_len=7, shuffle=False, loop=False))
    assert [r["input_ids"][0].tolist() for r in rows] == [[1, 2, 3, 4, 5, 6, 7], [8, 9, 15, 15, 15, 15, 15]]
    assert rows[0]["labels"][0].tolist() == [2, 3, -100, -100, 6, 7, -100]
    assert rows[1]["labels"][0].tolist() == [9] + [-100] * 6
    unpacked = list(ConversationBatches(shards, batch_size=3, seq_len=7, shuffle=False, loop=False,
                                        pack=False))[0]
    assert unpacked["input_ids"][:, 0].tolist() == [1, 4, 8]
    assert unpacked["labels"][1].tolist() == [-100, 6, 7, -100, -100, -100, -100]


def test_conversation_batches_resume_exactly(tmp_path):
    rng = np.random.default_rng(0)
    conversations = [Document(rng.integers(0, 30, n).tolist(), rng.integers(0, 2, n).tolist())
                     for n in rng.integers(2, 9, size=23)]
    shards = write_shards(tmp_path / "c", conversations, vocab_size=32)
    expected = [next(b) for b in [ConversationBatches(shards, 3, 10, seed=5)] for _ in range(12)]
    first = ConversationBatches(shards, 3, 10, seed=5)
    for _ in range(5):
        next(first)
    resumed = ConversationBatches(shards, 3, 10, seed=5)
    resumed.load_state_dict(first.state_dict())
    for want in expected[5:]:
        assert torch.equal(next(resumed)["labels"], want["labels"])


def test_too_little_data_for_one_row(tmp_path):
    shards = write_shards(tmp_path / "s", [[1, 2, 3]], vocab_size=8)
    with pytest.raises(ValueError, match="too few for one row of seq_len 8"):
        PackedBatches(shards, 1, 8)


def test_conversation_longer_than_a_row_is_truncated(tmp_path):
    shards = write_shards(tmp_path / "c", [Document(list(range(1, 13)), [1] * 12)], vocab_size=16)
    batch = next(ConversationBatches(shards, batch_size=1, seq_len=7, shuffle=False, loop=False))
    assert batch["input_ids"][0].tolist() == list(range(1, 8))
    assert batch["labels"][0].tolist() == list(range(2, 9))
