"""Megatron indexed datasets (PREFIX.bin + PREFIX.idx) read in place as token shards.

Teams that trained with Megatron hold their corpora in this format; reading it directly
spares detokenising and preparing hundreds of billions of tokens again. The layout, as
megatron-core's `IndexedDatasetBuilder` writes it (all integers little-endian):

    PREFIX.idx   b"MMIDIDX\\x00\\x00"  magic (9 bytes)
                 uint64 version (1)
                 uint8  dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                    6 float64, 7 float32, 8 uint16
                 uint64 S, the number of sequences
                 uint64 D, the number of document indices (documents + 1)
                 int32[S]  tokens per sequence
                 int64[S]  byte offset of each sequence in PREFIX.bin
                 int64[D]  sequence index where each document starts, then S
                 int8[S]   only in multimodal datasets: the mode of each sequence
    PREFIX.bin   the tokens of every sequence, back to back, in that dtype

A document is one or more sequences (sentences, when Megatron split them); training reads
documents, the unit packing and document-aware rows need. Empty documents carry no tokens
and are left out. The index says nothing about the vocabulary or the EOS token, so
`vocab_size` and `eos_token_id` are None; the trainer checks the ids against its model.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from familial.data.shards import ShardError, TokenShards

FORMAT = "megatron-indexed-v1"
MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")


def megatron_prefix(path: str | Path) -> Path | None:
    """The dataset prefix `path` names (itself, or without a .bin/.idx suffix), if one exists."""
    path = Path(path)
    for prefix in (path, path.with_suffix("") if path.suffix in (".bin", ".idx") else None):
        if prefix is not None and (Path(f"{prefix}.idx").is_file()
                                   or Path(f"{prefix}.bin").is_file()):
            return prefix
    return None


class MegatronShards(TokenShards):
    """A Megatron indexed dataset opened read-only: `.tokens` memory-maps PREFIX.bin."""

    def __init__(self, prefix: str | Path) -> None:
        self.path = Path(prefix)
        index, data = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for file in (index, data):
            if not file.is_file():
                raise ShardError(f"{file}: missing (a Megatron dataset is PREFIX.bin plus "
                                 f"PREFIX.idx)")
        dtype, lengths, pointers, starts = _read_index(index)
        itemsize = dtype.itemsize
        if np.any(pointers != np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)])
                  * itemsize):
            raise ShardError(f"{index}: sequences are not stored back to back in {data.name} "
                             f"(their byte offsets do not follow their lengths)")
        num_tokens = int(lengths.sum(dtype=np.int64))
        size = data.stat().st_size
        if size != num_tokens * itemsize:
            state = "truncated" if size < num_tokens * itemsize else "longer than its index says"
            raise ShardError(f"{data}: {size} bytes, expected {num_tokens * itemsize} "
                             f"({num_tokens} tokens x {itemsize} bytes, {dtype.name}, from "
                             f"{index.name}); the file is {state}")
        if num_tokens == 0:
            raise ShardError(f"{index}: the dataset holds no tokens")
        token_offsets = np.append(pointers // itemsize, num_tokens)
        self.documents = np.unique(token_offsets[starts])
        self.tokens = np.memmap(data, dtype=dtype, mode="r", shape=(num_tokens,))
        self.loss_mask = None
        self.vocab_size, self.eos_token_id = None, None
        self.manifest = {
            "format": FORMAT, "tokenizer": None, "vocab_size": None, "dtype": dtype.name,
            "num_tokens": num_tokens, "num_documents": self.num_documents,
            "num_sequences": int(lengths.size), "has_loss_mask": False,
            "eos_token_id": None, "sources": [str(self.path)],
        }

    def __repr__(self) -> str:
        return (f"MegatronShards({str(self.path)!r}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, dtype={self.tokens.dtype})")


def _read_index(file: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths, sequence byte offsets, document start sequences + S)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        header = handle.read(_HEADER.size)
    if len(header) < len(MAGIC) or header[:len(MAGIC)] != MAGIC:
        raise ShardError(f"{file}: not a Megatron index (starts with {header[:9]!r}, expected "
                         f"{MAGIC!r})")
    if len(header) < _HEADER.size:
        raise ShardError(f"{file}: truncated ({size} bytes, shorter than the "
                         f"{_HEADER.size}-byte header)")
    _, version, code, sequences, entries = _HEADER.unpack(header)
    if version != VERSION:
        raise ShardError(f"{file}: Megatron index version {version}; this reader knows "
                         f"version {VERSION}")
    if code not in DTYPES:
        raise ShardError(f"{file}: unknown dtype code {code} (Megatron writes "
                         f"{', '.join(f'{k} {np.dtype(v).name}' for k, v in DTYPES.items())})")
    expected = _HEADER.size + 12 * sequences + 8 * entries
    if size == expected + sequences and sequences:
        raise ShardError(f"{file}: a multimodal dataset (it stores a mode per sequence); "
                         f"only token datasets are read")
    if size != expected:
        raise ShardError(f"{file}: {size} bytes, expected {expected} for {sequences} sequences "
                         f"and {entries} document indices; the file is truncated or damaged")
    if sequences == 0:
        raise ShardError(f"{file}: the dataset holds no sequences")
    mapped = np.memmap(file, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(mapped, np.int32, sequences, _HEADER.size)
    pointers = np.frombuffer(mapped, np.int64, sequences, _HEADER.size + 4 * sequences)
    starts = np.frombuffer(mapped, np.int64, entries, _HEADER.size + 12 * sequences)
    if (entries < 2 or starts[0] != 0 or starts[-1] != sequences
            or np.any(np.diff(starts) < 0) or int(lengths.min()) < 0):
        raise ShardError(f"{file}: inconsistent document index (expected sequence indices "
                         f"rising from 0 to {sequences} and non-negative lengths)")
    return np.dtype(DTYPES[code]), lengths, pointers, starts
