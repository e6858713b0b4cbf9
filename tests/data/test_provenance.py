"""Shards and families record their tokenizer; train, eval, compare and serve refuse a mismatch."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from familial.checkpoint_io import save_family
from familial.cli import main
from familial.config import ConfigError, FamilyConfig
from familial.data import write_shards
from familial.data.demo_corpus import TOKENIZER_PATH, prepare_demo_data
from familial.data.provenance import TokenizerMismatch
from familial.data.tokenizer_train import save_tokenizer, train_bpe
from familial.model import FamilyModel
from familial.train.config import load_config
from familial.train.loop import Trainer

ENGLISH = Path(__file__).parent / "assets" / "english.txt"
VOCAB = 2048   # the shipped tokenizer's


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def other_tokenizer(tmp_path) -> Path:
    """A tokenizer that is not the shipped one (fitted to English, 300 ids)."""
    return save_tokenizer(train_bpe([ENGLISH.read_text()], 300), tmp_path / "english-tokenizer")


def prepare(tmp_path: Path, tokenizer: Path, name: str = "shards") -> Path:
    (tmp_path / "code.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    out = tmp_path / name
    assert main(["data", "prepare", str(tmp_path / "code.txt"), "--tokenizer", str(tokenizer),
                 "--out", str(out), "--no-progress"]) == 0
    return out


def config(tmp_path: Path, shards: Path, **init) -> dict:
    model = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "exits": [0, 1],
             "max_position_embeddings": 64}
    return {"run_dir": str(tmp_path / "run"), "steps": 1, "init": {"model": model, **init},
            "data": {"sources": [{"path": str(shards)}], "seq_len": 16, "batch_size": 2},
            "log": {"progress": False, "tensorboard": False}}


def family(tmp_path: Path, tokenizer: Path | None, name: str = "family") -> Path:
    torch.manual_seed(0)
    model = FamilyModel(FamilyConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, exits=[0, 1],
                                     max_position_embeddings=64))
    return save_family(model, tmp_path / name, tokenizer_source=tokenizer)


def test_prepare_and_the_demo_corpus_record_the_tokenizer_hash(tmp_path):
    shards = prepare(tmp_path, TOKENIZER_PATH)
    from familial.data import TokenShards

    assert TokenShards(shards).manifest["tokenizer_sha256"] == sha(TOKENIZER_PATH)
    train, _ = prepare_demo_data(tmp_path / "demo", limit_bytes=300_000)
    assert train.manifest["tokenizer_sha256"] == sha(TOKENIZER_PATH)


def test_train_refuses_shards_of_another_tokenizer(tmp_path, other_tokenizer):
    shards = prepare(tmp_path, TOKENIZER_PATH)
    with pytest.raises(TokenizerMismatch) as error:
        Trainer(load_config(data=config(tmp_path, shards, tokenizer=str(other_tokenizer))))
    message = str(error.value)
    assert "\n" not in message and str(shards) in message and str(other_tokenizer) in message
    assert sha(TOKENIZER_PATH)[:12] in message and sha(other_tokenizer / "tokenizer.json")[:12] in message
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_family_whose_tokenizer_differs_from_the_shards(tmp_path, other_tokenizer):
    shards = prepare(tmp_path, TOKENIZER_PATH)
    start = family(tmp_path, other_tokenizer)
    data = config(tmp_path, shards)
    data["init"] = {"family": str(start)}
    with pytest.raises(TokenizerMismatch, match="init.family"):
        Trainer(load_config(data=data))


def test_train_without_a_tokenizer_takes_the_shards_own(tmp_path, capsys):
    tokenizer = shutil.copytree(TOKENIZER_PATH.parent, tmp_path / "tok")
    shards = prepare(tmp_path, tokenizer)
    trainer = Trainer(load_config(data=config(tmp_path, shards)))
    assert trainer.config.init.tokenizer == str(tokenizer.resolve())
    assert "the shards' own" in capsys.readouterr().out
    (tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="pass --init.tokenizer") as error:
        Trainer(load_config(data=config(tmp_path / "again", shards)))
    assert "\n" not in str(error.value) and "is not there" in str(error.value)


def test_train_accepts_shards_without_a_hash_with_a_warning(tmp_path, capsys):
    rng = np.random.default_rng(0)
    old = write_shards(tmp_path / "old", [rng.integers(0, VOCAB, 20) for _ in range(8)],
                       vocab_size=VOCAB, tokenizer=str(TOKENIZER_PATH)).path
    trainer = Trainer(load_config(data=config(tmp_path, old, tokenizer=str(TOKENIZER_PATH))))
    assert trainer.config.init.tokenizer == str(TOKENIZER_PATH)
    assert f"warning: {old}: the shards record no tokenizer hash" in capsys.readouterr().err


def test_eval_and_compare_refuse_shards_of_another_tokenizer(tmp_path, capsys, other_tokenizer):
    shards = prepare(tmp_path, TOKENIZER_PATH)
    path = family(tmp_path, other_tokenizer)
    assert main(["eval", str(path), "--data", str(shards), "--no-latency"]) == 2
    err = capsys.readouterr().err
    assert "tokenised with" in err and str(path / "tokenizer.json") in err and str(shards) in err
    assert sha(TOKENIZER_PATH)[:12] in err
    assert main(["compare", str(path), "--train", str(shards), "--held-out", str(shards)]) == 2
    assert sha(other_tokenizer / "tokenizer.json")[:12] in capsys.readouterr().err


def test_a_family_records_its_tokenizer_and_refuses_a_replaced_one(tmp_path, capsys, other_tokenizer):
    path = family(tmp_path, TOKENIZER_PATH.parent)
    assert FamilyConfig.load_checksums(path)["tokenizer.json"] == sha(TOKENIZER_PATH)
    shutil.copyfile(other_tokenizer / "tokenizer.json", path / "tokenizer.json")
    assert main(["serve", str(path)]) == 2
    err = capsys.readouterr().err
    assert "records the family's tokenizer as sha256" in err and sha(TOKENIZER_PATH)[:12] in err
    assert main(["verify", str(path)]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_serve_of_a_missing_path_says_it_is_missing(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "tokenizer" not in err


def test_train_refuses_an_init_tokenizer_that_is_not_there(tmp_path):
    """The demo's train.toml names the demo's tokenizer, which exists only inside the clone."""
    shards = prepare(tmp_path, TOKENIZER_PATH)
    with pytest.raises(ConfigError, match=r"'init.tokenizer' = '.*nowhere': no tokenizer.json there "
                                          r"\(pass --init.tokenizer"):
        Trainer(load_config(data=config(tmp_path, shards, tokenizer=str(tmp_path / "nowhere"))))
