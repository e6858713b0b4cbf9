"""The checkpoint's chat template, rendered as transformers renders it.

The template comes from `chat_template.jinja` or the `chat_template` field of
`tokenizer_config.json` in the family directory; a family without one gets ChatML, the format
Qwen3 uses. Rendering runs in jinja2's immutable sandbox with the same options and helpers as
transformers' `apply_chat_template`, so stock templates (Qwen3's included) give the same text.
The server renders prompts with it and the data pipeline renders training conversations, so
both see one format. jinja2 is imported only when a template is compiled: ChatML data needs
no jinja2.

The template's own markers (`<|im_start|>`, `<|im_end|>`) are the tokenizer's special tokens; the
same strings inside a message are text, or a user could write a system turn into their own
message. `mark_specials` stands such strings in for private-use characters before rendering, and
`split_marked` finds them in the output, so the caller tokenises them as text.

A template is code that comes with a checkpoint, so compiling one evaluates nothing (jinja2
would otherwise fold constant expressions such as `9 ** (9 ** 99)` at compile time), and
rendering can be given a bound on the output. The server also renders in worker processes it
can stop (familial.serve.templates), which bounds time and memory.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from familial.config import ConfigError, read_json

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# Larger than any published chat template (Qwen3's is ~4 KB, tool-calling ones ~20 KB).
MAX_SOURCE_CHARS = 2**20


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed to render it."""


# Unicode's private use area: characters no tokenizer gives a meaning, that stand in for special
# tokens' strings while a template renders.
PRIVATE_USE = range(0xE000, 0xF900)


def mark_specials(messages: list[dict[str, Any]], specials: list[str],
                  template: str = "") -> tuple[list[dict[str, Any]], dict[str, str]]:
    """`messages` with every occurrence of a `specials` string in their text replaced by a
    private-use character found in no message nor in `template`, and {character: string}; the
    messages themselves when none holds one."""
    texts = [v for m in messages for v in m.values() if isinstance(v, str)]
    used = sorted((t for t in specials if any(t in text for text in texts)), key=len, reverse=True)
    if not used:
        return messages, {}
    taken = set(template).union(*map(set, texts))
    free = (chr(c) for c in PRIVATE_USE if chr(c) not in taken)
    marks = {token: next(free) for token in used}
    pattern = re.compile("|".join(map(re.escape, used)))

    def mark(value: Any) -> Any:
        return pattern.sub(lambda match: marks[match[0]], value) if isinstance(value, str) else value

    return [{k: mark(v) for k, v in m.items()} for m in messages], {c: t for t, c in marks.items()}


def split_marked(text: str, marks: dict[str, str]) -> list[tuple[str, bool]]:
    """`text` in pieces, each (string, True) where a mark stood (its special token's string,
    to tokenise as text) or (string, False) for the template's own text; no empty pieces."""
    if not marks:
        return [(text, False)] if text else []
    parts = re.split(f"([{''.join(marks)}])", text)
    return [(marks[part] if i % 2 else part, bool(i % 2)) for i, part in enumerate(parts) if part]


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _finalize(context: Any, value: Any) -> Any:
    return value


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


# The special tokens transformers passes to a template by name, besides the conversation.
TEMPLATE_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def read_template(path: str | Path) -> tuple[str | None, str, dict[str, str]]:
    """(source, where, special tokens) of the chat template at `path`, the one loader of both
    the server and the data pipeline.

    `path` is a family or tokenizer directory (its `chat_template.jinja`, else the
    `chat_template` of its `tokenizer_config.json`; source None when it has neither), a
    `tokenizer_config.json` (whose template must be there), or a template file. The special
    tokens are the strings of `TEMPLATE_TOKENS` in the tokenizer_config.json read, if any.
    """
    path = Path(path)
    if path.is_dir():
        config = _tokenizer_config(path / "tokenizer_config.json")
        jinja_path = path / "chat_template.jinja"
        if jinja_path.exists():
            return _read_source(jinja_path), str(jinja_path), _special_tokens(config)
        if config.get("chat_template") is None:
            return None, str(path), _special_tokens(config)
        path = path / "tokenizer_config.json"
    elif not path.is_file():
        raise ConfigError(f"{path}: no chat template file")
    elif path.suffix != ".json":
        return _read_source(path), str(path), {}
    else:
        config = _tokenizer_config(path)
    where = f"{path}: field 'chat_template'"
    source = config.get("chat_template")
    if isinstance(source, list):
        # Older transformers saved several named templates; "default" is the chat one.
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise ConfigError(f"{where}: a list of templates needs one named 'default', "
                              f"found {sorted(map(str, named))}")
        source = named["default"]
    if source is None:
        raise ConfigError(f"{path}: 'chat_template' is missing (expected a Jinja template string, "
                          f"or a list holding one named 'default')")
    if not isinstance(source, str):
        raise ConfigError(f"{where}: expected a Jinja template string, got {type(source).__name__}")
    return source, where, _special_tokens(config)


def _tokenizer_config(path: Path) -> dict[str, Any]:
    config = read_json(path) if path.exists() else {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def _read_source(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    tokens = {key: _token_text(config.get(key)) for key in TEMPLATE_TOKENS}
    return {key: value for key, value in tokens.items() if value is not None}


class ChatTemplate:
    def __init__(self, source: str = CHATML, bos_token: str | None = None,
                 eos_token: str | None = None, where: str = "chat template",
                 special_tokens: dict[str, str] | None = None) -> None:
        try:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("rendering a chat template needs jinja2 (pip install jinja2)") from None
        if len(source) > MAX_SOURCE_CHARS:
            raise ConfigError(f"{where}: a template of {len(source)} characters; the limit is {MAX_SOURCE_CHARS}")
        # optimized=False and a finalize that needs the render context: jinja2 then evaluates
        # no expression at compile time (both paths fold constants).
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, optimized=False,
                                                    extensions=[loopcontrols],
                                                    finalize=jinja2.pass_context(_finalize))
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ConfigError(f"{where}: line {error.lineno}: {error.message}") from None
        except RecursionError:
            raise ConfigError(f"{where}: the template nests too deeply to compile") from None
        self.source = source
        # The variables a template may refer to besides the conversation.
        self.tokens = {"bos_token": bos_token or "", "eos_token": eos_token or "",
                       **(special_tokens or {})}

    @classmethod
    def from_directory(cls, directory: str | Path, fallback: str | None = CHATML) -> ChatTemplate | None:
        """The directory's template; `fallback` (ChatML; None: no template) when it has none."""
        source, where, tokens = read_template(directory)
        if source is None:
            return None if fallback is None else cls(fallback, special_tokens=tokens)
        return cls(source, where=where, special_tokens=tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               max_chars: int | None = None) -> str:
        """Conversation [{"role", "content"}, ...] -> the prompt text the model continues;
        over `max_chars` characters of output it stops with a ChatTemplateError."""
        import jinja2

        parts, size = [], 0
        try:
            for part in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                               **self.tokens):
                size += len(part)
                if max_chars is not None and size > max_chars:
                    raise ChatTemplateError(f"the chat template's output for this conversation exceeds "
                                            f"{max_chars} characters")
                parts.append(part)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                ArithmeticError, RecursionError, MemoryError) as error:
            raise ChatTemplateError(f"chat template failed on this conversation: "
                                    f"{type(error).__name__}: {error}") from None
        return "".join(parts)
