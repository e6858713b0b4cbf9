"""`data prepare` in N processes and N parts: the bytes one pass writes, or a clear refusal."""

from __future__ import annotations

import os

import pytest
from prepare_inputs import (documents, files_of, prepare_args, write_gzip, write_jsonl,
                            write_parquet, write_text_files)

from familial.cli import main
from familial.data import encode, readers
from familial.data.demo_corpus import write_arithmetic_chat
from familial.data.shards import ShardWriter, TokenShards


@pytest.fixture
def mixed_inputs(tmp_path):
    """Text files, plain and gzipped JSONL, chat and parquet: every kind of chunk."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    texts = documents(count=60)
    return [write_text_files(inputs / "texts", texts[:6]),
            write_jsonl(inputs / "a.jsonl", texts[6:40]),
            write_arithmetic_chat(inputs / "chat.jsonl", count=12, seed=2),
            write_gzip(inputs / "b.jsonl.gz", texts[40:50]),
            write_parquet(inputs / "c.parquet", texts[50:], row_group_size=3)]


def test_three_workers_write_the_bytes_one_writes(tmp_path, mixed_inputs, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_BYTES", 900)   # many chunks in flight
    for workers in (1, 3):
        assert main(prepare_args(mixed_inputs, tmp_path / f"w{workers}", "--held-out", "0.2",
                                 "--workers", str(workers))) == 0
    one, three = files_of(tmp_path / "w1"), files_of(tmp_path / "w3")
    assert one == three
    assert {"train/loss_mask.bin", "held_out/tokens.bin"} <= set(one)


def test_shards_merged_in_any_order_equal_one_pass(tmp_path, mixed_inputs, capsys):
    assert main(prepare_args(mixed_inputs, tmp_path / "one", "--held-out", "0.2")) == 0
    parts = [tmp_path / f"part-{i}" for i in range(3)]
    for i, part in enumerate(parts):
        assert main(prepare_args(mixed_inputs, part, "--shard", f"{i}/3")) == 0
    counts = [TokenShards(part).num_documents for part in parts]
    assert min(counts) > 0 and sum(counts) == 6 + 34 + 12 + 10 + 10
    assert main(["data", "merge", str(tmp_path / "merged"), *map(str, parts[::-1]),
                 "--held-out", "0.2"]) == 0
    assert files_of(tmp_path / "merged") == files_of(tmp_path / "one")
    assert "train: " in capsys.readouterr().out


def test_a_jsonl_file_is_split_between_shards_at_line_starts(tmp_path):
    source = write_jsonl(tmp_path / "big.jsonl", documents(count=40))
    for i in range(2):
        assert main(prepare_args([source], tmp_path / f"p{i}", "--shard", f"{i}/2")) == 0
    assert main(prepare_args([source], tmp_path / "one")) == 0
    first, second, one = (TokenShards(tmp_path / name) for name in ("p0", "p1", "one"))
    assert first.num_documents and second.num_documents
    assert first.num_documents + second.num_documents == one.num_documents == 40
    assert (list(first.tokens) + list(second.tokens)) == list(one.tokens)


def _part(path, vocab=50, eos=0, shard=None, digest="abc"):
    writer = ShardWriter(path, vocab, eos_token_id=eos, tokenizer_sha256=digest, shard=shard,
                         sources=["in.jsonl"])
    writer.add([1, 2, 3])
    return writer.commit().path


@pytest.mark.parametrize("parts, message", [
    ([{}, {"vocab": 60}], "vocab_size is 60 but"),
    ([{}, {"eos": 1}], "eos_token_id is 1 but"),
    ([{}, {"digest": "def"}], "tokenizer_sha256 is 'def' but"),
    ([{"shard": (0, 2)}], "shard 1/2 is missing"),
    ([{"shard": (0, 2)}, {"shard": (0, 2)}], "shard 0/2 is given twice"),
    ([{"shard": (0, 2)}, {"shard": (1, 3)}], "shard 1/3 is not one of 2 parts"),
    ([{"shard": (0, 2)}, {}], "not a part written by `data prepare --shard`"),
])
def test_merge_refuses_parts_that_do_not_belong_together(tmp_path, capsys, parts, message):
    paths = [_part(tmp_path / f"p{i}", **options) for i, options in enumerate(parts)]
    assert main(["data", "merge", str(tmp_path / "out"), *map(str, paths)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n"])
def test_empty_input_is_refused_and_writes_nothing(tmp_path, capsys, content):
    (tmp_path / "empty.txt").write_text(content)
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n\n' if content else "")
    assert main(prepare_args([tmp_path / "empty.txt", tmp_path / "empty.jsonl"],
                             tmp_path / "out")) == 2
    assert "no documents (the inputs are empty or blank)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "empty.txt"]


def test_out_naming_a_file_is_refused_and_left_alone(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", documents(count=3))
    (tmp_path / "out").write_text("")
    for extra in ([], ["--overwrite"]):
        assert main(prepare_args([source], tmp_path / "out", *extra)) == 2
        assert "out: is a file, not a directory" in capsys.readouterr().err
    assert main(prepare_args([source], tmp_path / "out" / "shards")) == 2
    assert "is a file, so no directory can be made under it" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]


@pytest.mark.parametrize("options, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--shard", "2/2"], "--shard must be I/N with 0 <= I < N"),
    (["--shard", "0/2", "--held-out", "0.1"], "pass it to `familial data merge` instead"),
    (["--separator", ""], "it is empty"),
])
def test_bad_options_get_one_line(tmp_path, capsys, options, message):
    source = write_jsonl(tmp_path / "docs.jsonl", documents(count=3))
    assert main(prepare_args([source], tmp_path / "out", *options)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_progress_shows_tokens_per_second(tmp_path, capsys, monkeypatch):
    from familial.data import prepare

    monkeypatch.setattr(prepare, "PROGRESS_DELAY", 0.0)
    source = write_jsonl(tmp_path / "docs.jsonl", documents(count=5))
    assert main(prepare_args([source], tmp_path / "out")) == 0
    err = capsys.readouterr().err
    tokens = TokenShards(tmp_path / "out").num_tokens
    assert "tokenising" in err and f"{tokens:,} tokens" in err and "tokens/s" in err


def test_a_worker_that_dies_is_reported_in_one_line_and_nothing_is_written(tmp_path, mixed_inputs,
                                                                            monkeypatch, capsys):
    class DyingPool(encode.ProcessPoolExecutor):
        """Each worker exits at its first chunk, as one the kernel killed would."""

        def submit(self, fn, *args, **kwargs):
            return super().submit(os._exit, 1)

    monkeypatch.setattr(encode, "ProcessPoolExecutor", DyingPool)
    assert main(prepare_args(mixed_inputs, tmp_path / "out", "--workers", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "a tokenising worker process died" in err, err
    assert not issubclass(encode.WorkerDied, ValueError)
    assert not (tmp_path / "out").exists()
