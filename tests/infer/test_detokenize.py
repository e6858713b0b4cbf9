"""Streamed text: the pieces add up to the whole answer, and stop strings end it."""

from __future__ import annotations

from importlib import resources

import pytest
from tokenizers import Tokenizer

from familial.infer.detokenize import TextStream

TEXT = "def naïve(x):\n    return x  # ∑ über → 😀 done\n"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(resources.files("familial.data").joinpath("assets/tokenizer.json")))


def test_pieces_add_up_to_the_decoded_answer(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    stream = TextStream(tokenizer, [])
    pieces = [stream.add(t, final=i == len(ids) - 1)[0] for i, t in enumerate(ids)]
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT
    assert all("\ufffd" not in piece for piece in pieces)


def test_a_stop_string_across_tokens_ends_the_text_before_it(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    stream = TextStream(tokenizer, ["über"])
    pieces, stopped = [], False
    for t in ids:
        piece, stopped = stream.add(t, final=False)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == TEXT[:TEXT.index("über")]
