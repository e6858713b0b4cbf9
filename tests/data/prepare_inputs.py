"""The same documents written in every input format `data prepare` reads."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from familial.data.demo_corpus import TOKENIZER_PATH

SEPARATOR = "<|doc|>"


def documents(count: int = 30, seed: int = 0) -> list[str]:
    """Varied texts: code, accents and CJK, leading and trailing line breaks, long lines."""
    texts = []
    for i in range(count):
        body = "".join(f"def f{j}(x):\n    return x * {i + j}  # héllo 世界\n"
                       for j in range((i * 7 + seed) % 5))
        texts.append(f"Document {i}.\n{body}" + ("\n" if i % 3 == 0 else ""))
    texts[1] = "\n\nstarts with blank lines"
    texts[2] = "x" * 3000
    return texts


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts))
    return path


def write_gzip(path: Path, texts: list[str]) -> Path:
    path.write_bytes(gzip.compress(write_jsonl(path.with_suffix(".tmp"), texts).read_bytes()))
    path.with_suffix(".tmp").unlink()
    return path


def write_zstd(path: Path, texts: list[str]) -> Path:
    import zstandard

    raw = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
    half = len(raw) // 2
    # Two frames, as parallel compressors write them.
    compressor = zstandard.ZstdCompressor()
    path.write_bytes(compressor.compress(raw[:half]) + compressor.compress(raw[half:]))
    return path


def write_parquet(path: Path, texts: list[str], row_group_size: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path,
                   row_group_size=row_group_size)
    return path


def write_separated(path: Path, texts: list[str]) -> Path:
    path.write_text(f"\n{SEPARATOR}\n".join(texts), encoding="utf-8")
    return path


def write_text_files(directory: Path, texts: list[str]) -> Path:
    directory.mkdir()
    for i, text in enumerate(texts):
        (directory / f"doc-{i:03d}.txt").write_text(text, encoding="utf-8")
    return directory


def prepare_args(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return ["data", "prepare", *map(str, inputs), "--tokenizer", str(TOKENIZER_PATH),
            "--out", str(out), *extra]


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under a directory by relative path, for byte-for-byte comparison."""
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}
