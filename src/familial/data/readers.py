"""Input formats of `data prepare`, read as streams of chunks for the tokenising processes.

Formats: `text` (a file is one document, or many split by a separator), `jsonl` (one
`{"text": ...}` per line), `chat` (one `{"messages": [...]}` per line), each JSONL plain or
compressed (.gz, .zst), and `parquet` (a text column, read one row group at a time).

The inputs lie end to end as one range of bytes, each file at the offset where the one
before it ends. A document's position is the byte where it starts, and a part [lo, hi) of
that range holds the documents whose position falls in it. `--shard I/N` reads the I-th of
N equal parts, so N machines reading the same inputs take disjoint parts whose documents,
in shard order, are those of one pass in the same order. Positions are exact per line in
plain JSONL and per row group in parquet; a compressed stream or a text file is entered
only at its start, so it belongs whole to one part.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from familial.data.tokenize import read_text_file

FORMATS = ("auto", "text", "jsonl", "chat", "parquet")
CHUNK_BYTES = 1 << 18
_FILES_PER_CHUNK = 256
_COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def require(module: str, what: str) -> Any:
    """Import an optional dependency of the `data` extra, or fail in one line saying how."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what} needs the {module.split('.')[0]} package: "
                         f"pip install 'familial[data]'") from None


@dataclass(frozen=True)
class Input:
    path: Path
    format: str   # text | jsonl | chat | parquet
    start: int    # position of the file's first byte among all inputs
    size: int


@dataclass
class Chunk:
    """Documents for one tokenising task: texts ready to encode, or raw JSONL lines."""

    kind: str                     # texts | jsonl | chat
    where: str                    # the file, for error messages
    end: int                      # position in the inputs once this chunk is done
    texts: list[str] = field(default_factory=list)
    lines: bytes = b""
    first_line: int = 1


@dataclass(frozen=True)
class ReadOptions:
    field: str                     # JSONL field or parquet column holding the text
    separator: str | None          # splits text files into documents
    chunk_bytes: int               # about how much text goes to one tokenising task


def plan(files: list[Path], format: str) -> list[Input]:
    """Each file's format (`auto` detects it) and position among all inputs."""
    inputs, start = [], 0
    for file in files:
        size = file.stat().st_size
        inputs.append(Input(file, detect(file) if format == "auto" else format, start, size))
        start += size
    return inputs


def detect(file: Path) -> str:
    """parquet by suffix; .jsonl/.json (maybe compressed) are chat when their first record
    has `messages`, else jsonl; anything else is text."""
    if file.suffix == ".parquet":
        return "parquet"
    name = file.with_suffix("") if file.suffix in _COMPRESSED else file
    if name.suffix not in (".jsonl", ".json"):
        return "text"
    for block, _ in _blocks(file, 0, None, 1 << 16):
        for line in block.splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return "jsonl"   # the encoder names the line at fault
                return "chat" if isinstance(record, dict) and "messages" in record else "jsonl"
    return "jsonl"


def chunks(inputs: list[Input], options: ReadOptions, lo: int = 0,
           hi: float = float("inf")) -> Iterator[Chunk]:
    """The chunks of every document whose position lies in [lo, hi), in input order."""
    group: list[Input] = []   # whole-file text documents read together as one chunk
    size = 0
    for item in inputs:
        if item.format == "text" and options.separator is None:
            if lo <= item.start < hi:
                group.append(item)
                size += item.size
            if group and (size >= options.chunk_bytes or len(group) >= _FILES_PER_CHUNK):
                yield _text_files(group)
                group, size = [], 0
            continue
        if group:
            yield _text_files(group)
            group, size = [], 0
        compressed = item.path.suffix in _COMPRESSED
        if item.format == "parquet":
            yield from _parquet(item, options, lo, hi)
        elif item.format in ("jsonl", "chat") and not compressed:
            yield from _line_range(item, options, lo, hi)
        elif lo <= item.start < hi:
            yield from (_separated(item, options) if item.format == "text"
                        else _lines(item, 0, None, 1, options.chunk_bytes))
    if group:
        yield _text_files(group)


def _text_files(group: list[Input]) -> Chunk:
    return Chunk("texts", str(group[0].path), group[-1].start + group[-1].size,
                 [read_text_file(item.path) for item in group])


def _separated(item: Input, options: ReadOptions) -> Iterator[Chunk]:
    """Documents between separators. The line break right before and right after a
    separator goes with it, so a separator on a line of its own leaves no stray newline."""
    separator, texts, size, read = options.separator, [], 0, 0
    pending, scan, first = "", 0, True
    try:
        with open(item.path, encoding="utf-8") as handle:
            while True:
                block = handle.read(options.chunk_bytes)
                read += len(block)
                pending += block
                start = 0
                while block and (found := pending.find(separator, max(start, scan))) >= 0:
                    texts.append(_trim(pending[start:found], not first, True))
                    size += found - start
                    first, start = False, found + len(separator)
                if not block:
                    texts.append(_trim(pending[start:], not first, False))
                pending = pending[start:]
                scan = max(0, len(pending) - len(separator) + 1)
                if texts and (size >= options.chunk_bytes or not block):
                    yield Chunk("texts", str(item.path),
                                item.start + min(read, item.size) if block else
                                item.start + item.size, [t for t in texts if t])
                    texts, size = [], 0
                if not block:
                    return
    except UnicodeDecodeError as error:
        raise ValueError(f"{item.path}: not UTF-8 text ({error.reason})") from None


def _trim(piece: str, after_separator: bool, before_separator: bool) -> str:
    if after_separator and piece.startswith("\n"):
        piece = piece[1:]
    if before_separator and piece.endswith("\n"):
        piece = piece[:-1]
    return piece


def _line_range(item: Input, options: ReadOptions, lo: int, hi: float) -> Iterator[Chunk]:
    """The lines of a plain JSONL file that start in [lo, hi)."""
    local_lo, local_hi = lo - item.start, hi - item.start
    if local_hi <= 0 or local_lo >= max(item.size, 1):
        return
    with open(item.path, "rb") as handle:
        begin = _line_start(handle, local_lo)
        stop = item.size if local_hi >= item.size else _line_start(handle, local_hi)
        first_line = 1 + _count_lines(handle, begin)
    if begin < stop:
        yield from _lines(item, begin, stop, first_line, options.chunk_bytes)


def _line_start(handle: io.BufferedReader, position: int) -> int:
    """The start of the first line that starts at or after `position`."""
    if position <= 0:
        return 0
    handle.seek(position - 1)
    return position - 1 + len(handle.readline())


def _count_lines(handle: io.BufferedReader, stop: int) -> int:
    handle.seek(0)
    count = 0
    while handle.tell() < stop:
        count += handle.read(min(1 << 24, stop - handle.tell())).count(b"\n")
    return count


def _lines(item: Input, begin: int, stop: int | None, first_line: int,
           size: int) -> Iterator[Chunk]:
    line = first_line
    for block, end in _blocks(item.path, begin, stop, size):
        yield Chunk(item.format, str(item.path), item.start + end, lines=block, first_line=line)
        line += block.count(b"\n")


def _blocks(path: Path, begin: int, stop: int | None, size: int) -> Iterator[tuple[bytes, int]]:
    """Whole lines of bytes [begin, stop) of a file, decompressed when it is .gz or .zst,
    about `size` bytes at a time, each with the (compressed) bytes read so far."""
    with open(path, "rb") as raw:
        raw.seek(begin)
        carry = b""
        try:
            for piece in _pieces(path, raw, size, None if stop is None else stop - begin):
                block = carry + piece
                cut = block.rfind(b"\n") + 1
                carry = block[cut:]
                if cut:
                    yield block[:cut], raw.tell()
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path}: not a readable {_COMPRESSED.get(path.suffix, 'file')} "
                             f"stream ({error})") from None
        if carry:
            yield carry, raw.tell()


def _pieces(path: Path, raw: io.BufferedReader, size: int, left: int | None) -> Iterator[bytes]:
    """The file's bytes from where `raw` stands (at most `left` of them), decompressed."""
    kind = _COMPRESSED.get(path.suffix)
    if kind == "zstd":
        yield from _zstd_pieces(path, raw, size)
        return
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if kind == "gzip" else raw
    while left is None or left > 0:
        piece = stream.read(size if left is None else min(size, left))
        if not piece:
            return
        if left is not None:
            left -= len(piece)
        yield piece


def _zstd_pieces(path: Path, raw: io.BufferedReader, size: int) -> Iterator[bytes]:
    """Decompressed zstd frames one after another; a stream that stops inside a frame is an
    error (zstandard's stream reader would end quietly there)."""
    zstandard = require("zstandard", f"{path}: reading .zst")
    decompressor = zstandard.ZstdDecompressor()
    frame, started = decompressor.decompressobj(), False
    while data := raw.read(size):
        while data:
            started = True
            try:
                piece = frame.decompress(data)
            except zstandard.ZstdError as error:
                raise EOFError(f"damaged zstd data: {error}") from None
            if piece:
                yield piece
            data = b""
            if frame.eof:
                data, frame, started = frame.unused_data, decompressor.decompressobj(), False
    if started:
        raise EOFError("the stream ends inside a zstd frame (the file is truncated)")


def _parquet(item: Input, options: ReadOptions, lo: int, hi: float) -> Iterator[Chunk]:
    """The texts of one column, one row group at a time; a row group's position is the
    file's start plus its share of the rows before it, scaled to the file's size."""
    pa = require("pyarrow", f"{item.path}: reading parquet")
    parquet = require("pyarrow.parquet", f"{item.path}: reading parquet")
    try:
        file = parquet.ParquetFile(item.path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{item.path}: not a readable parquet file "
                         f"({str(error).splitlines()[0]})") from None
    with file:
        column = _text_column(item.path, file.schema_arrow, options.field, pa)
        rows = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
        total = max(sum(rows), 1)
        before = 0
        for group, count in enumerate(rows):
            position = item.start + item.size * before // total
            if lo <= position < hi and count:
                yield from _row_group(item, file, group, column, before, total, options, pa)
            before += count


def _text_column(path: Path, schema: Any, name: str, pa: Any) -> str:
    if name not in schema.names:
        raise ValueError(f"{path}: no column {name!r} (the columns are "
                         f"{', '.join(map(repr, schema.names))}; choose one with --column)")
    kind = schema.field(name).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or str(kind) == "string_view"):
        raise ValueError(f"{path}: column {name!r} holds {kind}, expected strings")
    return name


def _row_group(item: Input, file: Any, group: int, column: str, before: int, total: int,
               options: ReadOptions, pa: Any) -> Iterator[Chunk]:
    meta = file.metadata.row_group(group)
    per_row = max(meta.total_byte_size // max(meta.num_rows, 1), 1)
    row = before
    try:
        for batch in file.iter_batches(batch_size=max(options.chunk_bytes // per_row, 1),
                                       row_groups=[group], columns=[column]):
            values = batch.column(0)
            if values.null_count:
                missing = row + values.to_pylist().index(None)
                raise ValueError(f"{item.path}: row {missing} has no {column!r} (null)")
            row += len(values)
            yield Chunk("texts", str(item.path), item.start + item.size * row // total,
                        values.to_pylist())
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{item.path}: row group {group} is not readable "
                         f"({str(error).splitlines()[0]})") from None
