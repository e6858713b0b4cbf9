"""Token shards on disk: one flat memory-mapped token stream plus a document index.

A shard directory holds

    manifest.json    {"format": "familial-tokens-v1", "tokenizer", "vocab_size", "dtype",
                      "num_tokens", "num_documents", "has_loss_mask", "eos_token_id", "sources",
                      "tokenizer_sha256", and "shard": {"index", "count"} for one part of a
                      corpus prepared on several machines}
    tokens.bin       token ids, uint16 when the vocabulary fits (< 65536) else uint32
    documents.npy    int64 start offset of every document, plus the end (num_documents + 1)
    loss_mask.bin    optional, uint8 per token: 1 where the token is a training target

`ShardWriter` (and `write_shards` on top of it) streams documents to disk (only the document
offsets stay in memory, 8 bytes per document) into a temporary directory renamed into place
at the end, so a crash never leaves a half-written shard directory. `TokenShards` validates
everything cheap on open and names the file at fault; `open_shards` also opens a Megatron
indexed dataset (`familial.data.megatron`) as the same read-only interface.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from familial import checks
from familial.staging import naming, remove_stale, staging_path

FORMAT = "familial-tokens-v1"
MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
DOCUMENTS = "documents.npy"
LOSS_MASK = "loss_mask.bin"
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_CHECK_CHUNK = 1 << 24


class ShardError(ValueError):
    """A shard directory is missing, malformed or inconsistent, or documents are invalid."""


@dataclass(frozen=True)
class Document:
    """One document's token ids and, for chat data, its loss mask (1 = training target)."""

    ids: Sequence[int] | np.ndarray
    loss_mask: Sequence[int] | np.ndarray | None = None


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size < 65536 else "uint32"


class ShardWriter:
    """Streams documents into a new shard directory; `commit()` renames it into place.

    `discard()` (call it when anything fails) removes everything written so far. Documents
    without a loss mask count as all targets, so plain text and chat data can share one
    directory; the mask file exists only when some document carries a mask.
    """

    def __init__(self, path: str | Path, vocab_size: int, tokenizer: str | None = None,
                 eos_token_id: int | None = None, sources: list[Any] | None = None,
                 overwrite: bool = False, tokenizer_sha256: str | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        self.target = Path(path)
        checks.positive_int(f"{self.target}: vocab_size", vocab_size, error=ShardError)
        _check_target(self.target, overwrite)
        self.vocab_size, self.tokenizer, self.eos_token_id = vocab_size, tokenizer, eos_token_id
        self.sources, self.shard = list(sources or []), shard
        self.tokenizer_sha256 = tokenizer_sha256
        self.dtype = np.dtype(_DTYPES[dtype_for_vocab(vocab_size)])
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.target)
        self.staging = staging_path(self.target)
        self.staging.mkdir()
        self.offsets = array("q", [0])
        self._mask = None
        self._tokens = open(self.staging / TOKENS, "wb")

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def add(self, item: Document | Sequence[int] | np.ndarray) -> None:
        document = item if isinstance(item, Document) else Document(item)
        ids = np.asarray(document.ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ShardError(f"document {self.num_documents}: expected a non-empty 1-D sequence "
                             f"of token ids, got shape {ids.shape}")
        mask = None if document.loss_mask is None else np.asarray(document.loss_mask)
        if mask is not None and mask.shape != ids.shape:
            raise ShardError(f"document {self.num_documents}: loss mask has shape {mask.shape}, "
                             f"expected ({ids.size},) like its token ids")
        self.add_batch(ids, np.array([ids.size]), mask)

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray,
                  loss_mask: np.ndarray | None = None) -> None:
        """Append documents given as one flat token array and the length of each document."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size == 0:
            return
        ends = np.cumsum(lengths)
        first = self.num_documents
        if lengths.ndim != 1 or tokens.ndim != 1 or int(lengths.min()) <= 0 \
                or int(ends[-1]) != tokens.size:
            raise ShardError(f"documents {first}..{first + lengths.size - 1}: lengths must be "
                             f"positive and add up to the {tokens.size} tokens given")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            at = int(np.searchsorted(ends, int(np.argmax(tokens == bad)), side="right"))
            raise ShardError(f"document {first + at}: token id {bad} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if loss_mask is not None:
            _check_mask(loss_mask, tokens.size, first)
            if self._mask is None:
                self._mask = open(self.staging / LOSS_MASK, "wb")
                with self._naming(self._mask.name):
                    _write_ones(self._mask, self.num_tokens)
            with self._naming(self._mask.name):
                self._mask.write(np.ascontiguousarray(loss_mask, dtype=np.uint8).data)
        elif self._mask is not None:
            with self._naming(self._mask.name):
                _write_ones(self._mask, tokens.size)
        with self._naming(self._tokens.name):
            self._tokens.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self.offsets.frombytes((ends + self.num_tokens).tobytes())

    @contextlib.contextmanager
    def _naming(self, file: str | Path) -> Iterator[None]:
        """A write that fails without a file name (ENOSPC) names the file and the shards."""
        try:
            with naming(file):
                yield
        except OSError as error:
            raise OSError(error.errno, f"{error.strerror} (writing the shards {self.target}; "
                                       f"nothing of them is kept)", error.filename) from None

    def commit(self) -> "TokenShards":
        for handle in (self._tokens, self._mask):
            if handle is not None and not handle.closed:
                with self._naming(handle.name):
                    handle.close()
        if self.num_documents == 0:
            self.discard()
            raise ShardError(f"{self.target}: no documents to write (the input is empty)")
        with self._naming(self.staging / DOCUMENTS):
            np.save(self.staging / DOCUMENTS, np.frombuffer(self.offsets, dtype=np.int64))
        manifest = {
            "format": FORMAT, "tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
            "dtype": self.dtype.name, "num_tokens": self.num_tokens,
            "num_documents": self.num_documents, "has_loss_mask": self._mask is not None,
            "eos_token_id": self.eos_token_id, "sources": self.sources,
            "tokenizer_sha256": self.tokenizer_sha256,
        }
        if self.shard is not None:
            manifest["shard"] = {"index": self.shard[0], "count": self.shard[1]}
        with self._naming(self.staging / MANIFEST):
            (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for file in self.staging.iterdir():
            with open(file, "rb") as handle, self._naming(file):
                os.fsync(handle.fileno())
        if self.target.exists():
            trash = staging_path(self.target, "old")
            os.replace(self.target, trash)
            os.replace(self.staging, self.target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.staging, self.target)
        return TokenShards(self.target)

    def discard(self) -> None:
        for handle in (self._tokens, self._mask):
            if handle is not None and not handle.closed:
                with contextlib.suppress(OSError):  # the flush of a full disk fails again
                    handle.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def write_shards(path: str | Path, documents: Iterable[Document | Sequence[int] | np.ndarray],
                 vocab_size: int, tokenizer: str | None = None, eos_token_id: int | None = None,
                 sources: list[Any] | None = None, overwrite: bool = False,
                 tokenizer_sha256: str | None = None) -> "TokenShards":
    """Write documents (id sequences or `Document`s) as a shard directory and open it."""
    writer = ShardWriter(path, vocab_size, tokenizer, eos_token_id, sources, overwrite,
                         tokenizer_sha256)
    try:
        for document in documents:
            writer.add(document)
    except BaseException:
        writer.discard()
        raise
    return writer.commit()


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, lies under a file, or holds data not to be replaced."""
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ShardError(f"{target}: {parent} is a file, so no directory can be made "
                                 f"under it (choose another output directory)")
            break
    if target.exists() and not target.is_dir():
        raise ShardError(f"{target}: is a file, not a directory (choose another output "
                         f"directory; --overwrite replaces only a shard directory)")
    if target.is_dir() and not overwrite and any(target.iterdir()):
        raise ShardError(f"{target}: already exists and is not empty (choose another "
                         f"output directory, or pass --overwrite to replace it)")


def _write_ones(handle, count: int) -> None:
    chunk = np.ones(min(count, _CHECK_CHUNK), dtype=np.uint8).tobytes()
    while count > 0:
        handle.write(chunk[:count])
        count -= len(chunk)


def _check_mask(mask: np.ndarray, length: int, first: int) -> None:
    if mask.shape != (length,):
        raise ShardError(f"document {first}: loss mask has shape {mask.shape}, expected "
                         f"({length},) like its token ids")
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 1):
        raise ShardError(f"document {first}: loss mask values must be 0 or 1")


class TokenShards:
    """A shard directory opened read-only: `.tokens` and `.loss_mask` are memory maps."""

    def __init__(self, path: str | Path, check_token_ids: bool = False) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_token_id: int | None = self.manifest["eos_token_id"]
        dtype = np.dtype(_DTYPES[self.manifest["dtype"]])
        num_tokens = self.manifest["num_tokens"]
        self.tokens = _open_memmap(self.path / TOKENS, dtype, num_tokens)
        self.loss_mask = (_open_memmap(self.path / LOSS_MASK, np.dtype(np.uint8), num_tokens)
                          if self.manifest["has_loss_mask"] else None)
        self.documents = _read_documents(self.path / DOCUMENTS, self.manifest)
        if check_token_ids:
            self.check_token_ids()

    @property
    def num_tokens(self) -> int:
        return int(self.documents[-1] - self.documents[0])

    @property
    def num_documents(self) -> int:
        return len(self.documents) - 1

    def __len__(self) -> int:
        return self.num_documents

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.path)!r}, documents={self.num_documents}, "
                f"tokens={self.num_tokens})")

    def document(self, index: int) -> np.ndarray:
        """The token ids of document `index` (a view into the memory map)."""
        start, end = self.documents[index], self.documents[index + 1]
        return self.tokens[start:end]

    def document_mask(self, index: int) -> np.ndarray:
        """The loss mask of document `index`; all ones when the shards carry no mask."""
        start, end = self.documents[index], self.documents[index + 1]
        if self.loss_mask is None:
            return np.ones(end - start, dtype=np.uint8)
        return self.loss_mask[start:end]

    def check_token_ids(self, vocab_size: int | None = None) -> None:
        """Scan the tokens in chunks and fail on any id outside [0, vocab_size) (by default
        the vocabulary the shards declare)."""
        limit = self.vocab_size if vocab_size is None else vocab_size
        start, end = int(self.documents[0]), int(self.documents[-1])
        for offset in range(start, end, _CHECK_CHUNK):
            block = self.tokens[offset:min(offset + _CHECK_CHUNK, end)]
            low, high = block.min(), block.max()
            if low < 0 or high >= limit:
                raise ShardError(f"{self.tokens.filename}: token id {low if low < 0 else high} "
                                 f"near offset {offset} is outside the vocabulary [0, {limit})"
                                 f"{f' of {MANIFEST}' if vocab_size is None else ''}")

    def select(self, start: int, stop: int) -> "TokenShards":
        """A view of documents [start, stop): same memory maps, fewer documents."""
        if not 0 <= start < stop <= self.num_documents:
            raise ShardError(f"{self.path}: document range [{start}, {stop}) is empty or "
                             f"outside [0, {self.num_documents})")
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.documents = self.documents[start:stop + 1]
        return view

    def split(self, held_out: float | int) -> tuple["TokenShards", "TokenShards"]:
        """(train, held-out): the last documents are held out, a fraction or a count of them.

        Holding out the tail rather than a random sample keeps both parts contiguous in the
        memory map; shuffle at write time if the source order is not already mixed.
        """
        count = (int(held_out) if isinstance(held_out, int)
                 else int(round(held_out * self.num_documents)))
        if not 0 < count < self.num_documents:
            raise ShardError(f"{self.path}: cannot hold out {held_out!r} of {self.num_documents} "
                             f"documents (need at least one document on each side)")
        cut = self.num_documents - count
        return self.select(0, cut), self.select(cut, self.num_documents)


def open_shards(path: str | Path) -> TokenShards:
    """Token shards to train on: our shard directory, or a Megatron indexed dataset named by
    its path prefix (PREFIX.bin + PREFIX.idx; a path ending in .bin or .idx also names it)."""
    path = Path(path)
    if path.is_dir():
        return TokenShards(path)
    from familial.data.megatron import MegatronShards, megatron_prefix

    prefix = megatron_prefix(path)
    if prefix is None:
        raise ShardError(f"{path}: neither a token shard directory (written by `familial data "
                         f"prepare`) nor a Megatron indexed dataset ({path}.bin + {path}.idx)")
    return MegatronShards(prefix)


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not path.is_dir():
        raise ShardError(f"{path}: not a token shard directory (it does not exist or is a file)")
    if not file.exists():
        raise ShardError(f"{file}: missing; write shards with `familial data prepare`")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{file}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{file}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("vocab_size", "num_tokens", "num_documents"):
        value = manifest.get(key)
        if not checks.is_integer(value) or value < 0:
            raise ShardError(f"{file}: '{key}' must be a non-negative integer, got {value!r}")
    if manifest["vocab_size"] == 0:
        raise ShardError(f"{file}: 'vocab_size' must be positive")
    if manifest.get("dtype") not in _DTYPES:
        raise ShardError(f"{file}: 'dtype' is {manifest.get('dtype')!r}, expected one of "
                         f"{sorted(_DTYPES)}")
    if np.iinfo(_DTYPES[manifest["dtype"]]).max < manifest["vocab_size"] - 1:
        raise ShardError(f"{file}: dtype {manifest['dtype']} cannot hold ids of vocab_size "
                         f"{manifest['vocab_size']}")
    if not isinstance(manifest.get("has_loss_mask"), bool):
        raise ShardError(f"{file}: 'has_loss_mask' must be true or false")
    eos = manifest.get("eos_token_id")
    if eos is not None and (not checks.is_integer(eos) or not 0 <= eos < manifest["vocab_size"]):
        raise ShardError(f"{file}: 'eos_token_id' must be null or an id below vocab_size, "
                         f"got {eos!r}")
    if manifest["num_tokens"] == 0 or manifest["num_documents"] == 0:
        raise ShardError(f"{file}: the shards are empty (no tokens or no documents)")
    manifest.setdefault("tokenizer", None)
    manifest.setdefault("sources", [])
    return manifest


def _open_memmap(file: Path, dtype: np.dtype, count: int) -> np.memmap:
    if not file.exists():
        raise ShardError(f"{file}: missing (the manifest lists {count} tokens)")
    size = file.stat().st_size
    if size != count * dtype.itemsize:
        raise ShardError(f"{file}: {size} bytes, expected {count * dtype.itemsize} "
                         f"({count} tokens x {dtype.itemsize} bytes, {dtype.name}); the file "
                         f"is truncated or does not belong to this manifest")
    return np.memmap(file, dtype=dtype, mode="r", shape=(count,))


def _read_documents(file: Path, manifest: dict[str, Any]) -> np.ndarray:
    if not file.exists():
        raise ShardError(f"{file}: missing (the document index of the shards)")
    try:
        offsets = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ShardError(f"{file}: not a readable .npy array ({error})") from None
    expected = manifest["num_documents"] + 1
    if offsets.dtype != np.int64 or offsets.shape != (expected,):
        raise ShardError(f"{file}: expected int64 offsets of shape ({expected},), got "
                         f"{offsets.dtype} {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != manifest["num_tokens"]:
        raise ShardError(f"{file}: offsets must run from 0 to num_tokens "
                         f"{manifest['num_tokens']}, got {offsets[0]} .. {offsets[-1]}")
    if np.any(np.diff(offsets) <= 0):
        bad = int(np.argmax(np.diff(offsets) <= 0))
        raise ShardError(f"{file}: offsets must increase strictly (document {bad} starts at "
                         f"{offsets[bad]} and ends at {offsets[bad + 1]})")
    return offsets
