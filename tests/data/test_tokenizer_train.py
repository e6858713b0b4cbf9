"""`familial tokenizer train`: a tokenizer for a new corpus that `data prepare` takes as it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from familial.chat_template import CHATML
from familial.cli import main
from familial.data.demo_corpus import TOKENIZER_PATH, write_arithmetic_chat
from familial.data.shards import TokenShards
from familial.data.tokenize import load_tokenizer, vocab_size
from familial.data.tokenizer_train import SPECIAL_TOKENS

ENGLISH = Path(__file__).parent / "assets" / "english.txt"


def characters_per_token(tokenizer, text: str) -> float:
    return len(text) / len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_trained_tokenizer_fits_english_and_prepares_text_and_chat_data(tmp_path, capsys):
    out = tmp_path / "tokenizer"
    assert main(["tokenizer", "train", str(ENGLISH), "--vocab-size", "512", "--out", str(out)]) == 0
    assert "characters per token" in capsys.readouterr().out
    tokenizer = load_tokenizer(out)
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2]
    assert 259 < vocab_size(tokenizer) <= 512
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML and config["eos_token"] == "<|endoftext|>"
    # Fitted to English, it needs fewer tokens than the shipped (Python-code) tokenizer, and
    # byte-level BPE still encodes what it never saw.
    text = ENGLISH.read_text()
    assert characters_per_token(tokenizer, text) > characters_per_token(load_tokenizer(TOKENIZER_PATH), text)
    unseen = "Σ = 12345 ü 🙂\n\tdef f(x): return x"
    assert tokenizer.decode(tokenizer.encode(unseen).ids) == unseen

    shards_dir = tmp_path / "shards"
    assert main(["data", "prepare", str(ENGLISH), "--tokenizer", str(out), "--out", str(shards_dir)]) == 0
    shards = TokenShards(shards_dir)
    assert shards.vocab_size == vocab_size(tokenizer) and shards.eos_token_id == 0
    ids = np.asarray(shards.document(0)).tolist()
    assert ids[-1] == 0 and tokenizer.decode(ids[:-1]) == text

    chat = write_arithmetic_chat(tmp_path / "chat.jsonl", 4)
    assert main(["data", "prepare", str(chat), "--tokenizer", str(out), "--out", str(tmp_path / "chat")]) == 0
    assert "using the chat template of" in capsys.readouterr().out
    chat_shards = TokenShards(tmp_path / "chat")
    assert chat_shards.loss_mask is not None and 0 < int(chat_shards.loss_mask.sum()) < chat_shards.num_tokens


def test_tokenizer_train_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("keep")
    cases = [
        ([str(ENGLISH), "--vocab-size", "100"], "--vocab-size 100"),
        ([str(empty), "--vocab-size", "300"], "no text to train on"),
        ([str(binary), "--vocab-size", "300"], "not UTF-8"),
        ([str(tmp_path / "missing.txt"), "--vocab-size", "300"], "no such file"),
    ]
    for arguments, message in cases:
        out = tmp_path / "out"
        assert main(["tokenizer", "train", *arguments, "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1
        assert not out.exists()
    assert main(["tokenizer", "train", str(ENGLISH), "--vocab-size", "300", "--out", str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
