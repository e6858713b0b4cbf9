"""A tiny family that has learned the alphabet, with its own byte-level BPE tokenizer.

Trained once per session (a few seconds): text is runs of consecutive letters ("f g h i"),
so after "k l m" every member should put " n" far above any other letter.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from familial.checkpoint_io import save_family
from familial.config import FamilyConfig
from familial.model import FamilyModel

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EOS = "<|endoftext|>"


def alphabet_run(rng: random.Random, length: int) -> str:
    start = rng.randrange(len(LETTERS) - length + 1)
    return " ".join(LETTERS[start:start + length])


def write_tokenizer(directory: Path) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    tokenizer.train_from_iterator([alphabet_run(rng, 8) for _ in range(200)], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer


def tiny_config(vocab_size: int, eos: int) -> FamilyConfig:
    return FamilyConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        exits=[1, 3], member_names={"small": 1, "full": 3},
                        max_position_embeddings=128, eos_token_id=eos)


def train_alphabet(model: FamilyModel, tokenizer: Tokenizer, steps: int = 40) -> None:
    rng = random.Random(1)
    eos = model.config.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = [tokenizer.encode(alphabet_run(rng, rng.randint(6, 14))).ids + [eos] for _ in range(16)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
        logits = model(ids[:, :-1])
        loss = sum(torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                     ids[:, 1:].reshape(-1))
                   for out in logits.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@contextlib.contextmanager
def one_thread():
    # Models this small gain nothing from a second thread, and on a shared 2-core machine
    # two threads per process (times pytest-xdist workers) run up to 8x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def alphabet_family(tmp_path_factory) -> Path:
    """Directory of a family (exits 1 and 3, aliases small/full) trained on the alphabet."""
    root = tmp_path_factory.mktemp("alphabet")
    tokenizer = write_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    model = FamilyModel(tiny_config(tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS)))
    with one_thread():
        train_alphabet(model, tokenizer)
    return save_family(model, root / "family", tokenizer_source=root / "tokenizer")


def alphabet_shards(family: Path, directory: Path, seed: int, count: int) -> Path:
    """Token shards of `count` alphabet runs drawn with `seed`, each ending in eos."""
    from familial.data.shards import write_shards

    tokenizer = Tokenizer.from_file(str(family / "tokenizer.json"))
    rng = random.Random(seed)
    eos = tokenizer.token_to_id(EOS)
    documents = [tokenizer.encode(alphabet_run(rng, rng.randint(6, 14))).ids + [eos]
                 for _ in range(count)]
    path = directory / "shards"
    write_shards(path, documents, vocab_size=tokenizer.get_vocab_size())
    return path


@pytest.fixture(scope="session")
def alphabet_held_out(alphabet_family, tmp_path_factory) -> Path:
    """Token shards of alphabet runs the family never saw (another seed)."""
    return alphabet_shards(alphabet_family, tmp_path_factory.mktemp("held_out"), seed=7, count=30)


@pytest.fixture(scope="session")
def alphabet_train(alphabet_family, tmp_path_factory) -> Path:
    """Token shards of alphabet runs standing in for the family's training data (n-gram baselines)."""
    return alphabet_shards(alphabet_family, tmp_path_factory.mktemp("train"), seed=3, count=200)
