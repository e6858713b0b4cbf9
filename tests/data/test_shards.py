"""Token shards: round trip, atomic writes, and clear errors for damaged directories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from familial.data.shards import Document, ShardError, TokenShards, write_shards


def _documents(count=5, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 20))).tolist() for _ in range(count)]


def test_round_trip_keeps_every_document(tmp_path):
    documents = _documents()
    shards = write_shards(tmp_path / "s", iter(documents), vocab_size=50, tokenizer="tok.json",
                          eos_token_id=3, sources=["a.txt"])
    reopened = TokenShards(tmp_path / "s", check_token_ids=True)
    assert reopened.tokens.dtype == np.uint16 and reopened.loss_mask is None
    assert [reopened.document(i).tolist() for i in range(len(reopened))] == documents
    assert reopened.num_tokens == sum(map(len, documents)) == shards.manifest["num_tokens"]
    assert reopened.manifest["sources"] == ["a.txt"] and reopened.eos_token_id == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_large_vocabulary_uses_uint32(tmp_path):
    shards = write_shards(tmp_path / "s", [[151935, 0, 70000]], vocab_size=151936)
    assert shards.tokens.dtype == np.uint32 and shards.document(0).tolist() == [151935, 0, 70000]


def test_loss_mask_defaults_to_ones_for_unmasked_documents(tmp_path):
    shards = write_shards(tmp_path / "s", [[1, 2], Document([3, 4, 5], [0, 1, 1]), [6]],
                          vocab_size=10)
    assert shards.manifest["has_loss_mask"]
    assert shards.loss_mask.tolist() == [1, 1, 0, 1, 1, 1]
    assert shards.document_mask(1).tolist() == [0, 1, 1]


def test_split_holds_out_the_last_documents(tmp_path):
    documents = _documents(count=10)
    shards = write_shards(tmp_path / "s", documents, vocab_size=50)
    train, held_out = shards.split(0.2)
    assert len(train) == 8 and len(held_out) == 2
    assert [held_out.document(i).tolist() for i in range(2)] == documents[8:]
    assert train.num_tokens + held_out.num_tokens == shards.num_tokens
    with pytest.raises(ShardError, match="cannot hold out"):
        shards.split(10)


def test_bad_documents_fail_and_leave_nothing_behind(tmp_path):
    with pytest.raises(ShardError, match=r"document 1: token id 50 is outside the vocabulary \[0, 50\)"):
        write_shards(tmp_path / "s", [[1, 2], [50]], vocab_size=50)
    with pytest.raises(ShardError, match="no documents"):
        write_shards(tmp_path / "s", [], vocab_size=50)
    with pytest.raises(ShardError, match="loss mask has shape"):
        write_shards(tmp_path / "s", [Document([1, 2], [1])], vocab_size=50)
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_overwrite(tmp_path):
    write_shards(tmp_path / "s", [[1]], vocab_size=5)
    with pytest.raises(ShardError, match="already exists"):
        write_shards(tmp_path / "s", [[2]], vocab_size=5)
    assert write_shards(tmp_path / "s", [[2]], vocab_size=5, overwrite=True).document(0).tolist() == [2]


def test_truncated_tokens_named_in_error(tmp_path):
    write_shards(tmp_path / "s", _documents(), vocab_size=50)
    tokens = tmp_path / "s" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(ShardError, match=r"tokens\.bin: .* bytes, expected .*truncated"):
        TokenShards(tmp_path / "s")


@pytest.mark.parametrize("text, message", [
    ("{not json", r"manifest\.json: not valid JSON"),
    ("[1, 2]", r"manifest\.json: expected a JSON object"),
    ('{"format": "other"}', r"format is 'other'"),
])
def test_malformed_manifest_named_in_error(tmp_path, text, message):
    write_shards(tmp_path / "s", _documents(), vocab_size=50)
    (tmp_path / "s" / "manifest.json").write_text(text)
    with pytest.raises(ShardError, match=message):
        TokenShards(tmp_path / "s")


def test_manifest_field_errors(tmp_path):
    write_shards(tmp_path / "s", _documents(), vocab_size=50)
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "num_tokens": "many"}))
    with pytest.raises(ShardError, match="'num_tokens' must be a non-negative integer"):
        TokenShards(tmp_path / "s")
    path.write_text(json.dumps({**manifest, "num_tokens": 0, "num_documents": 0}))
    with pytest.raises(ShardError, match="shards are empty"):
        TokenShards(tmp_path / "s")
    (tmp_path / "t").mkdir()
    with pytest.raises(ShardError, match=r"manifest\.json: missing"):
        TokenShards(tmp_path / "t")


def test_inconsistent_document_offsets(tmp_path):
    write_shards(tmp_path / "s", [[1, 2], [3], [4, 5]], vocab_size=10)
    np.save(tmp_path / "s" / "documents.npy", np.array([0, 2, 2, 5], dtype=np.int64))
    with pytest.raises(ShardError, match=r"documents\.npy: offsets must increase strictly \(document 1"):
        TokenShards(tmp_path / "s")
    np.save(tmp_path / "s" / "documents.npy", np.array([0, 2, 3], dtype=np.int64))
    with pytest.raises(ShardError, match=r"documents\.npy: expected int64 offsets of shape \(4,\)"):
        TokenShards(tmp_path / "s")


def test_out_of_vocabulary_ids_found_on_request(tmp_path):
    write_shards(tmp_path / "s", [[1, 2, 9]], vocab_size=10)
    path = tmp_path / "s" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "vocab_size": 5}))
    TokenShards(tmp_path / "s")
    with pytest.raises(ShardError, match=r"tokens\.bin: token id 9 .* outside the vocabulary \[0, 5\)"):
        TokenShards(tmp_path / "s", check_token_ids=True)
