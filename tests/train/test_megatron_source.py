"""A Megatron indexed dataset as a training source: the same training as our own shards."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from familial.data import write_shards
from familial.data.shards import ShardError
from familial.train.config import load_config
from familial.config import FamilyConfig
from familial.data.shards import open_shards
from familial.train.loop import Trainer, build_batches, check_data_fits
from familial.train.metrics import read_metrics

from megatron_core import indexed, megatron_core  # noqa: F401 (megatron_core: an autouse fixture)

# Files written by megatron-core itself: without it these skip, or fail under CI (tests/conftest.py).
pytestmark = pytest.mark.reference

VOCAB = 53   # the tiny model's vocabulary in make_config (tests/train/conftest.py)


def counting_documents(count=40, low=0, high=VOCAB, seed=0):
    rng = np.random.default_rng(seed)
    return [(low + (rng.integers(0, high - low) + np.arange(rng.integers(8, 30))) % (high - low))
            .tolist() for _ in range(count)]


def write_megatron(prefix, documents, dtype=np.uint16):
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in documents:
        builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def test_training_on_megatron_data_equals_training_on_our_shards(tmp_path, make_config):
    documents = counting_documents()
    ours = write_shards(tmp_path / "ours", documents, vocab_size=VOCAB, eos_token_id=0).path
    theirs = write_megatron(tmp_path / "corpus_text_document", documents)
    trainers = []
    for name, source in (("a", ours), ("b", theirs)):
        config = make_config(tmp_path / name, source, steps=4)
        assert config["init"]["model"]["vocab_size"] == VOCAB
        trainer = Trainer(load_config(data=config))
        trainer.run()
        trainers.append(trainer)
    a, b = (trainer.model.state_dict() for trainer in trainers)
    assert all(torch.equal(a[name], b[name]) for name in a)
    losses = [[record["loss"] for record in read_metrics(tmp_path / name / "run")]
              for name in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_megatron_data_mixes_with_ours_by_weight(tmp_path):
    ours = write_shards(tmp_path / "ours", counting_documents(low=0, high=20), VOCAB).path
    theirs = write_megatron(tmp_path / "theirs", counting_documents(low=30, high=VOCAB))
    config = tmp_path / "train.toml"
    config.write_text(f"""
run_dir = "{tmp_path / 'run'}"
steps = 2
[init.model]
vocab_size = {VOCAB}
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
exits = [1]
max_position_embeddings = 64
[data]
seq_len = 8
batch_size = 4
sources = [{{path = "{ours}", weight = 1.0}}, {{path = "{theirs}", weight = 3.0}}]
""")
    batches = build_batches(load_config(config).data, seed=0)
    firsts = torch.cat([next(batches)["input_ids"][:, 0] for _ in range(10)])
    assert int((firsts >= 30).sum()) == 30 and int((firsts < 20).sum()) == 10


def test_ids_past_the_model_vocabulary_are_refused_before_training(tmp_path, make_config):
    theirs = write_megatron(tmp_path / "big", [[1, 2, 3] * 10, [VOCAB + 7] * 20], np.int32)
    config = load_config(data=make_config(tmp_path, theirs))
    with pytest.raises(ShardError, match=rf"big\.bin: token id {VOCAB + 7} .* outside the "
                                         rf"vocabulary \[0, {VOCAB}\)"):
        Trainer(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_megatron_ids_are_scanned_once_per_node(tmp_path, make_config, monkeypatch):
    # The node's first rank scans (and stops the run on a bad id); the others do not read.
    theirs = write_megatron(tmp_path / "big", [[1, 2, 3] * 10, [VOCAB + 7] * 20], np.int32)
    config = load_config(data=make_config(tmp_path, theirs))
    scans = []
    monkeypatch.setattr(type(open_shards(theirs)), "check_token_ids", lambda self, vocab: scans.append(vocab))
    monkeypatch.setenv("LOCAL_RANK", "1")
    check_data_fits(config.resolved_stages(), FamilyConfig(**config.init.model.to_dict()))
    assert scans == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    check_data_fits(config.resolved_stages(), FamilyConfig(**config.init.model.to_dict()))
    assert scans == [VOCAB]
