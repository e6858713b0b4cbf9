"""`familial data prepare` end to end with the shipped tokenizer."""

from __future__ import annotations

import json

import numpy as np

from familial.cli import main
from familial.data.demo_corpus import TOKENIZER_PATH, write_arithmetic_chat
from familial.data.shards import TokenShards
from familial.data.tokenize import load_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"


def test_prepare_text_file(tmp_path, capsys):
    (tmp_path / "code.txt").write_text(TEXT)
    (tmp_path / "more.txt").write_text("Hello, world.")
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(tmp_path / "code.txt"), str(tmp_path / "more.txt"),
                 "--tokenizer", str(TOKENIZER_PATH), "--out", str(out)]) == 0
    shards = TokenShards(out, check_token_ids=True)
    tokenizer = load_tokenizer(TOKENIZER_PATH)
    assert shards.num_documents == 2 and shards.loss_mask is None
    assert shards.eos_token_id == tokenizer.token_to_id("<|endoftext|>")
    assert shards.vocab_size == tokenizer.get_vocab_size() and shards.tokens.dtype == np.uint16
    first = shards.document(0).tolist()
    assert first[-1] == shards.eos_token_id
    assert tokenizer.decode(first[:-1], skip_special_tokens=False) == TEXT
    printed = capsys.readouterr().out
    assert f"2 documents, {shards.num_tokens:,} tokens" in printed


def test_prepare_chat_with_held_out_split(tmp_path, capsys):
    chat = write_arithmetic_chat(tmp_path / "chat.jsonl", count=40, seed=1)
    out = tmp_path / "sft"
    assert main(["data", "prepare", str(chat), "--tokenizer", str(TOKENIZER_PATH),
                 "--out", str(out), "--held-out", "0.1"]) == 0
    train, held_out = TokenShards(out / "train"), TokenShards(out / "held_out")
    assert (train.num_documents, held_out.num_documents) == (36, 4)
    tokenizer = load_tokenizer(TOKENIZER_PATH)
    first = json.loads(chat.read_text().splitlines()[0])["messages"]
    ids, mask = train.document(0), train.document_mask(0).astype(bool)
    assert tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False) == \
        first[-1]["content"] + "<|im_end|>"
    assert "training targets" in capsys.readouterr().out


def test_bad_input_names_the_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(bad), "--tokenizer", str(TOKENIZER_PATH),
                 "--out", str(out)]) == 2
    assert "data.jsonl:2: expected an object with a string 'text' field" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_info_prints_the_manifest(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT)
    main(["data", "prepare", str(tmp_path), "--tokenizer", str(TOKENIZER_PATH),
          "--out", str(tmp_path / "s")])
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out)["num_documents"] == 1


def test_demo_names_the_shipped_tokenizer(tmp_path, capsys):
    (tmp_path / "code.txt").write_text(TEXT)
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(tmp_path / "code.txt"), "--tokenizer", "demo",
                 "--out", str(out)]) == 0
    shards = TokenShards(out)
    assert shards.manifest["tokenizer"] == str(TOKENIZER_PATH.parent.resolve())
    assert shards.num_tokens == len(load_tokenizer(TOKENIZER_PATH).encode(TEXT).ids) + 1
