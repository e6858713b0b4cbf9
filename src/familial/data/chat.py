"""Chat data: render conversations with a chat template and mask all but assistant turns.

The default rendering is ChatML as Qwen uses it (without Qwen3's `<think>` scaffolding):

    <|im_start|>{role}\n{content}<|im_end|>\n

A checkpoint's own template (its chat_template.jinja, the `chat_template` of its
tokenizer_config.json, or a .jinja file), read by the server's loader
(`familial.chat_template.read_template`), is rendered with jinja2 the way transformers does. The loss mask is 1 exactly on each
assistant turn's content and the `<|im_end|>` that closes it: the model learns to answer and
to stop, never to predict the user. Masks are exact by construction: the rendered text is
cut at the borders of assistant spans and each piece is tokenised on its own, so no token
straddles a border. The prompt piece ends in `<|im_start|>assistant\n`, which is also how a
generation prompt is tokenised at inference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from familial.chat_template import ChatTemplate, read_template
from familial.config import ConfigError
from familial.data.shards import Document

END_OF_TURN = "<|im_end|>"
Span = tuple[int, int]


def load_chat_template(path: str | Path) -> tuple[str, dict[str, str]]:
    """(template, special tokens) as `familial.chat_template.read_template` reads them (a
    directory, a tokenizer_config.json or a template file), the server's loader; a directory
    without a template is refused, as data needs one to render."""
    source, _, tokens = read_template(path)
    if source is None:
        raise ConfigError(f"{path}: no chat template (neither chat_template.jinja nor a "
                          f"'chat_template' in tokenizer_config.json)")
    return source, tokens


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for index, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: message {index} must be an object with string 'role' "
                             f"and 'content', got {json.dumps(message)[:80]}")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to train on")
    return messages


def render_chatml(messages: Sequence[dict[str, str]]) -> tuple[str, list[Span]]:
    """ChatML text and the character spans of assistant content plus its `<|im_end|>`."""
    parts: list[str] = []
    spans: list[Span] = []
    length = 0
    for message in messages:
        header = f"<|im_start|>{message['role']}\n"
        body = message["content"] + END_OF_TURN
        if message["role"] == "assistant":
            spans.append((length + len(header), length + len(header) + len(body)))
        parts.extend([header, body, "\n"])
        length += len(header) + len(body) + 1
    return "".join(parts), spans


def render_template(messages: Sequence[dict[str, str]], template: str,
                    end_of_turn: str = END_OF_TURN, special_tokens: dict[str, str] | None = None,
                    where: str = "conversation") -> tuple[str, list[Span]]:
    """Render with a jinja chat template; find assistant spans in the rendered text.

    Each message's content is located in order, as written or, failing that, stripped of
    surrounding whitespace as many templates do; an assistant span runs from its content
    through the `end_of_turn` that follows it.
    """
    text = ChatTemplate(template, where=where, special_tokens=special_tokens).render(
        list(messages), add_generation_prompt=False)
    spans: list[Span] = []
    cursor = 0
    for index, message in enumerate(messages):
        content = message["content"]
        if not content.strip():
            if message["role"] == "assistant":
                raise ValueError(f"{where}: assistant message {index} is empty")
            continue
        start = text.find(content, cursor)
        if start < 0:
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise ValueError(f"{where}: the chat template's output does not contain message "
                             f"{index}'s content; cannot locate the assistant turns")
        cursor = start + len(content)
        if message["role"] == "assistant":
            close = cursor + len(text[cursor:]) - len(text[cursor:].lstrip())
            if not text.startswith(end_of_turn, close):
                raise ValueError(f"{where}: the chat template puts no {end_of_turn!r} after "
                                 f"assistant message {index}; pass the template's end-of-turn "
                                 f"token")
            cursor = close + len(end_of_turn)
            spans.append((start, cursor))
    return text, spans


def encode_spans(tokenizer: Tokenizer, text: str, spans: Sequence[Span]) -> Document:
    """Token ids of `text` with mask 1 on the tokens of `spans`, each piece encoded alone."""
    ids: list[int] = []
    mask: list[int] = []
    cursor = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, value in ((text[cursor:start], 0), (text[start:end], 1)):
            if piece:
                piece_ids = tokenizer.encode(piece, add_special_tokens=False).ids
                ids.extend(piece_ids)
                mask.extend([value] * len(piece_ids))
        cursor = end
    return Document(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8))


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
                template: str | None = None, end_of_turn: str = END_OF_TURN,
                special_tokens: dict[str, str] | None = None,
                where: str = "conversation") -> Document:
    """One conversation as token ids plus its assistant-only loss mask."""
    if template is None:
        text, spans = render_chatml(messages)
    else:
        text, spans = render_template(messages, template, end_of_turn, special_tokens, where)
    return encode_spans(tokenizer, text, spans)
