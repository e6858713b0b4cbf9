"""The demo's data: a tokenizer fitted to the training files, then train and held-out shards.

Fitting the tokenizer takes about a second, so the demo fits one of the recipe's size to its
own training files instead of shipping one per recipe (held-out files never shape it). Both
are kept under the output directory and reused by later runs of the same recipe.
"""

from __future__ import annotations

from pathlib import Path

from familial.data.demo_corpus import demo_documents, prepare_demo_data
from familial.data.shards import TokenShards
from familial.data.tokenizer_train import save_tokenizer, train_bpe
from familial.demo.recipe import DemoPlan


def prepare_corpus(plan: DemoPlan, output: Path) -> tuple[Path, Path]:
    """(tokenizer directory, data directory with train/ and held_out/ shards)."""
    key = f"{plan.corpus_bytes}-{plan.held_out_every}-{plan.vocab_size}"
    tokenizer_dir, data_dir = output / f"tokenizer-{key}", output / f"data-{key}"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train, _ = demo_documents(plan.corpus_bytes, plan.held_out_every)
        save_tokenizer(train_bpe(train, plan.vocab_size), tokenizer_dir, overwrite=True)
    if not all((data_dir / part / "manifest.json").is_file() for part in ("train", "held_out")):
        prepare_demo_data(data_dir, plan.corpus_bytes, overwrite=True,
                          tokenizer_path=tokenizer_dir / "tokenizer.json",
                          held_out_every=plan.held_out_every)
    return tokenizer_dir, data_dir


def held_out_bytes_per_token(plan: DemoPlan, data_dir: Path) -> float:
    """UTF-8 bytes of held-out text per held-out token (converts nats/token to nats/byte)."""
    _, held_out = demo_documents(plan.corpus_bytes, plan.held_out_every)
    return sum(len(text.encode("utf-8")) for text in held_out) / TokenShards(data_dir / "held_out").num_tokens
