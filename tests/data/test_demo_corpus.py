"""The bundled demo corpus and shipped tokenizer work offline and deterministically."""

from __future__ import annotations

from familial.data.demo_corpus import (TOKENIZER_PATH, demo_documents,
                                       prepare_demo_data)
from familial.data.tokenize import load_tokenizer
from familial.data.tokenizer_train import SPECIAL_TOKENS


def test_shipped_tokenizer_is_small_and_round_trips():
    assert TOKENIZER_PATH.stat().st_size < 500_000
    tokenizer = load_tokenizer(TOKENIZER_PATH)
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2]
    text = "<|im_start|>user\nΣ = 12345 ü 🙂<|im_end|>\n    def f(x): return x\n"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids[0] == 1 and tokenizer.decode(ids, skip_special_tokens=False) == text


def test_demo_documents_are_deterministic_with_a_fixed_held_out_part():
    train, held_out = demo_documents(limit_bytes=400_000)
    again_train, again_held_out = demo_documents(limit_bytes=400_000)
    assert (train, held_out) == (again_train, again_held_out)
    assert len(held_out) >= 1 and len(train) >= 10 * len(held_out)
    assert sum(len(text.encode()) for text in train + held_out) <= 400_000
    assert not set(train) & set(held_out)


def test_prepare_demo_data_writes_train_and_held_out_shards(tmp_path):
    train, held_out = prepare_demo_data(tmp_path / "demo", limit_bytes=300_000)
    assert train.manifest["sources"] == ["python-stdlib:train"]
    assert held_out.num_tokens > 0 and train.num_tokens > held_out.num_tokens
    assert train.vocab_size == 2048 and train.eos_token_id == 0
    assert int(train.document(3)[-1]) == 0
