"""Every input format gives the shards of the same documents written as plain JSONL."""

from __future__ import annotations

import gzip
import sys

import pytest
from prepare_inputs import (SEPARATOR, documents, files_of, prepare_args, write_gzip,
                            write_jsonl, write_parquet, write_separated, write_text_files,
                            write_zstd)

from familial.cli import main
from familial.data.demo_corpus import TOKENIZER_PATH
from familial.data.shards import TokenShards
from familial.data.tokenize import load_tokenizer

WRITERS = {
    "jsonl.gz": (lambda d, t: write_gzip(d / "docs.jsonl.gz", t), []),
    "jsonl.zst": (lambda d, t: write_zstd(d / "docs.jsonl.zst", t), []),
    "parquet": (lambda d, t: write_parquet(d / "docs.parquet", t), ["--column", "text"]),
    "separated text": (lambda d, t: write_separated(d / "docs.txt", t),
                       ["--separator", SEPARATOR]),
    "text files": (lambda d, t: write_text_files(d / "texts", t), []),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    source = write_jsonl(root / "docs.jsonl", documents())
    assert main(prepare_args([source], root / "out", "--no-progress")) == 0
    shards = files_of(root / "out")
    return {name: shards[name] for name in ("tokens.bin", "documents.npy")}


@pytest.mark.parametrize("kind", WRITERS)
def test_each_format_writes_the_shards_of_plain_jsonl(tmp_path, reference, kind, monkeypatch):
    from familial.data import readers

    # Small chunks, so documents and parquet row groups straddle chunk borders.
    monkeypatch.setattr(readers, "CHUNK_BYTES", 700)
    write, options = WRITERS[kind]
    source = write(tmp_path, documents())
    assert main(prepare_args([source], tmp_path / "out", *options)) == 0
    written = files_of(tmp_path / "out")
    assert {name: written[name] for name in reference} == reference


def test_separator_on_its_own_line_and_inside_a_line(tmp_path, capsys):

    text = "first\n---\nsecond\n\n---\n\nthird---fourth\n---\n   \n---\n"
    (tmp_path / "notes.txt").write_text(text)
    assert main(prepare_args([tmp_path / "notes.txt"], tmp_path / "out",
                             "--separator=---")) == 0
    shards = TokenShards(tmp_path / "out")
    tokenizer = load_tokenizer(TOKENIZER_PATH)
    decoded = [tokenizer.decode(shards.document(i).tolist()[:-1], skip_special_tokens=False)
               for i in range(len(shards))]
    assert decoded == ["first", "second\n", "\nthird", "fourth"]
    assert "left out 1 blank documents" in capsys.readouterr().out


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, reference, monkeypatch):
    import pyarrow.parquet as pq

    def whole_file(*args, **kwargs):
        raise AssertionError("read the whole parquet file at once")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    source = write_parquet(tmp_path / "docs.parquet", documents(), row_group_size=3)
    assert main(prepare_args([source], tmp_path / "out")) == 0
    assert files_of(tmp_path / "out")["tokens.bin"] == reference["tokens.bin"]


@pytest.mark.parametrize("damage, message", [
    ("missing column", ("docs.parquet: no column 'body' (the columns are 'id', 'text'; "
                        "choose one with --column)")),
    ("corrupt parquet", "docs.parquet: not a readable parquet file"),
    ("truncated gzip", "docs.jsonl.gz: not a readable gzip stream"),
    ("truncated zstd", ("docs.jsonl.zst: not a readable zstd stream (the stream ends inside "
                        "a zstd frame")),
    ("bad JSON line", "docs.jsonl.gz:3: not valid JSON"),
])
def test_damaged_inputs_get_one_line_and_write_nothing(tmp_path, capsys, damage, message):
    texts = documents(count=8)
    options = []
    if damage == "missing column":
        source, options = write_parquet(tmp_path / "docs.parquet", texts), ["--column", "body"]
    elif damage == "corrupt parquet":
        source = write_parquet(tmp_path / "docs.parquet", texts)
        source.write_bytes(source.read_bytes()[:-100])
    elif damage == "bad JSON line":
        source = tmp_path / "docs.jsonl.gz"
        source.write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b"}\n{"text": \n'))
    else:
        write = write_gzip if damage == "truncated gzip" else write_zstd
        source = write(tmp_path / f"docs.jsonl.{'gz' if 'gzip' in damage else 'zst'}", texts)
        source.write_bytes(source.read_bytes()[:-30])
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(prepare_args([source], tmp_path / "out", *options)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_missing_extra_names_the_install_command(tmp_path, capsys, monkeypatch):
    source = write_zstd(tmp_path / "docs.jsonl.zst", documents(count=3))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    assert main(prepare_args([source], tmp_path / "out")) == 2
    assert "needs the zstandard package: pip install 'familial[data]'" in capsys.readouterr().err
