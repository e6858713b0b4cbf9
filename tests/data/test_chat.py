"""Chat rendering and the assistant-only loss mask, with the shipped demo tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from familial.chat_template import CHATML
from familial.data.chat import (encode_chat, load_chat_template,
                                render_chatml, validate_messages)
from familial.data.demo_corpus import TOKENIZER_PATH
from familial.data.tokenize import load_tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4, obviously."},
    {"role": "user", "content": "And   twice that?\n"},
    {"role": "assistant", "content": "  8\n\nDone."},
]
# A Qwen3-like template: strips contents and puts a think block before the last answer.
QWEN3_LIKE = (
    "{% for message in messages %}{{ '<|im_start|>' + message.role + '\\n' }}"
    "{% if message.role == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ message.content | trim }}{{ '<|im_end|>\\n' }}{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_PATH)


def _masked_runs(tokenizer, document):
    ids, mask = np.asarray(document.ids), np.asarray(document.loss_mask)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False)
            for a, b in zip(edges[::2], edges[1::2])]


def test_chatml_mask_covers_exactly_the_assistant_turns(tokenizer):
    document = encode_chat(tokenizer, MESSAGES)
    text, _ = render_chatml(MESSAGES)
    assert tokenizer.decode(document.ids.tolist(), skip_special_tokens=False) == text
    assert _masked_runs(tokenizer, document) == ["2 + 2 = 4, obviously.<|im_end|>",
                                                 "  8\n\nDone.<|im_end|>"]
    im_start = tokenizer.token_to_id("<|im_start|>")
    assert not document.loss_mask[document.ids == im_start].any()


def test_jinja_chatml_matches_the_builtin_renderer(tokenizer):
    builtin = encode_chat(tokenizer, MESSAGES)
    templated = encode_chat(tokenizer, MESSAGES, template=CHATML)
    assert np.array_equal(builtin.ids, templated.ids)
    assert np.array_equal(builtin.loss_mask, templated.loss_mask)


def test_custom_template_spans_follow_the_rendered_text(tokenizer):
    document = encode_chat(tokenizer, MESSAGES, template=QWEN3_LIKE)
    assert _masked_runs(tokenizer, document) == ["2 + 2 = 4, obviously.<|im_end|>",
                                                 "8\n\nDone.<|im_end|>"]
    decoded = tokenizer.decode(document.ids.tolist(), skip_special_tokens=False)
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n8" in decoded


def test_template_without_end_of_turn_is_rejected(tokenizer):
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(ValueError, match=r"no '<\|im_end\|>' after assistant message 2"):
        encode_chat(tokenizer, MESSAGES, template=template, where="chat.jsonl:3")


def test_message_validation_names_the_problem():
    with pytest.raises(ValueError, match="f.jsonl:2: no assistant message"):
        validate_messages([{"role": "user", "content": "hi"}], "f.jsonl:2")
    with pytest.raises(ValueError, match="message 1 must be an object with string 'role'"):
        validate_messages([{"role": "user", "content": "hi"}, {"role": "assistant"}], "f.jsonl:2")


def test_template_and_special_tokens_from_tokenizer_config(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": QWEN3_LIKE, "eos_token": "<|im_end|>",
                                  "bos_token": {"content": "<s>"}}))
    template, special = load_chat_template(tmp_path)
    assert template == QWEN3_LIKE
    assert special == {"eos_token": "<|im_end|>", "bos_token": "<s>"}
    config.write_text(json.dumps({"eos_token": "x"}))
    with pytest.raises(ValueError, match="'chat_template' is missing"):
        load_chat_template(config)


def test_data_and_server_read_a_template_directory_alike(tmp_path):
    """One loader: a directory's chat_template.jinja wins over tokenizer_config.json for both,
    and both get the same special tokens (pad and unk too, as transformers passes them)."""
    from familial.chat_template import ChatTemplate
    from familial.config import ConfigError

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "ignored", "eos_token": "</s>", "pad_token": {"content": "<pad>"}}))
    (tmp_path / "chat_template.jinja").write_text("{{ pad_token }}{{ messages[0].content }}{{ eos_token }}")
    template, special = load_chat_template(tmp_path)
    assert (template, special) == ((tmp_path / "chat_template.jinja").read_text(),
                                   {"eos_token": "</s>", "pad_token": "<pad>"})
    assert ChatTemplate.from_directory(tmp_path).render(MESSAGES[:1]) == "<pad>You are terse.</s>"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert ChatTemplate.from_directory(tmp_path, fallback=None) is None
    with pytest.raises(ConfigError, match="no chat template"):
        load_chat_template(tmp_path)
    with pytest.raises(ConfigError, match="no chat template file"):
        load_chat_template(tmp_path / "missing.jinja")
