"""Megatron indexed datasets written by megatron-core itself, read back in place."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from familial.cli import main
from familial.data.megatron import MegatronShards
from familial.data.shards import ShardError, open_shards

from megatron_core import indexed, megatron_core  # noqa: F401 (megatron_core: an autouse fixture)

# Files written by megatron-core itself: without it these skip, or fail under CI (tests/conftest.py).
pytestmark = pytest.mark.reference

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16]


def write_megatron(prefix, documents, dtype=np.uint16, sentences=False):
    """Documents via megatron-core's IndexedDatasetBuilder; with `sentences`, each document
    is stored as several sequences, as Megatron's --split-sentences does."""
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in documents:
        if sentences and len(ids) > 2:
            cut = len(ids) // 2
            builder.add_document(ids, [cut, len(ids) - cut])
        else:
            builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def random_documents(count=12, high=100, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(1, 20))).tolist() for _ in range(count)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: dtype.__name__)
def test_every_dtype_reads_back_document_for_document(tmp_path, dtype):
    documents = random_documents()
    prefix = write_megatron(tmp_path / "corpus_text_document", documents, dtype,
                            sentences=True)
    shards = open_shards(prefix)
    assert isinstance(shards, MegatronShards) and shards.tokens.dtype == dtype
    assert isinstance(shards.tokens, np.memmap)
    assert [shards.document(i).astype(np.int64).tolist() for i in range(len(shards))] == \
        documents
    reference = indexed.IndexedDataset(str(prefix))
    assert np.array_equal(shards.tokens, np.concatenate([reference[i] for i in
                                                         range(len(reference))]))
    assert open_shards(f"{prefix}.bin").num_tokens == shards.num_tokens


def test_empty_documents_carry_no_tokens_and_are_left_out(tmp_path):
    builder = indexed.IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.uint16)
    builder.add_document([1, 2], [2])
    builder.end_document()
    builder.add_document([3], [1])
    builder.finalize(str(tmp_path / "d.idx"))
    shards = open_shards(tmp_path / "d")
    assert [shards.document(i).tolist() for i in range(len(shards))] == [[1, 2], [3]]


def test_info_prints_the_dataset(tmp_path, capsys):
    write_megatron(tmp_path / "d", random_documents(count=3))
    assert main(["data", "info", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert '"format": "megatron-indexed-v1"' in out and '"num_documents": 3' in out


def _damage(tmp_path, how):
    prefix = write_megatron(tmp_path / "d", random_documents(), np.int32)
    index, data = (tmp_path / "d.idx").read_bytes(), tmp_path / "d.bin"
    if how == "truncated bin":
        data.write_bytes(data.read_bytes()[:-4])
    elif how == "bad magic":
        (tmp_path / "d.idx").write_bytes(b"NOTANIDX\x00" + index[9:])
    elif how == "other version":
        (tmp_path / "d.idx").write_bytes(index[:9] + struct.pack("<Q", 2) + index[17:])
    elif how == "truncated idx":
        (tmp_path / "d.idx").write_bytes(index[:-8])
    elif how == "missing bin":
        data.unlink()
    return prefix


@pytest.mark.parametrize("how, message", [
    ("truncated bin", r"d\.bin: \d+ bytes, expected \d+ .*int32.*the file is truncated"),
    ("bad magic", r"d\.idx: not a Megatron index \(starts with b'NOTANIDX"),
    ("other version", r"d\.idx: Megatron index version 2; this reader knows version 1"),
    ("truncated idx", r"d\.idx: \d+ bytes, expected \d+ for 12 sequences"),
    ("missing bin", r"d\.bin: missing"),
])
def test_damaged_datasets_are_named_in_one_line(tmp_path, how, message):
    prefix = _damage(tmp_path, how)
    with pytest.raises(ShardError, match=message):
        open_shards(prefix)


def test_a_path_that_is_neither_is_refused(tmp_path):
    with pytest.raises(ShardError, match="neither a token shard directory .* nor a Megatron"):
        open_shards(tmp_path / "nothing")
