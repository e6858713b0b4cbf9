"""A GGUF file's tokenizer as `tokenizer.json`, and a `tokenizer.json` as GGUF metadata.

GGUF keeps a byte-level BPE tokenizer as arrays (`tokenizer.ggml.tokens`, `.merges`,
`.token_type`) plus the name of its pre-tokenizer (`tokenizer.ggml.pre`), which llama.cpp maps
to a fixed list of split regexes. The table below holds those regexes as llama.cpp applies
them (src/llama-vocab.cpp), written as the `tokenizers` pre-tokenizer that splits text the same
way, so both sides give the same ids. Reading back, a tokenizer.json's pre-tokenizer is matched
against the same table to name it for llama.cpp.
"""

from __future__ import annotations

import json
from typing import Any

from familial.config import ConfigError

# llama.cpp's token types (llama_token_type): what each vocabulary entry is.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


# tokenizer.ggml.pre -> (pre-tokenizer, BPE ignore_merges, llama.cpp's BOS default).
# GPT-2's split is ByteLevel's own regex; SmolLM2 splits digits one by one first.
PRE_TOKENIZERS: dict[str, tuple[dict, bool, bool]] = {
    "gpt-2": (_byte_level(True), False, False),
    "smollm": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                       _byte_level(True)]}, False, False),
    "qwen2": ({"type": "Sequence", "pretokenizers": [_split(QWEN2_SPLIT), _byte_level(False)]}, False, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [_split(LLAMA3_SPLIT), _byte_level(False)]}, True, True),
}
# Other names llama.cpp gives the same splits.
PRE_ALIASES = {"gpt2": "gpt-2", "deepseek-r1-qwen": "qwen2", "llama3": "llama-bpe", "llama-v3": "llama-bpe"}


def tokenizer_from_metadata(meta: dict[str, Any], where: str) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json dict) from a GGUF file's `tokenizer.*` fields."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(f"{where}: field 'tokenizer.ggml.model' = {model!r}: only byte-level BPE "
                          f"tokenizers ('gpt2', as Llama 3, Qwen and SmolLM use) are supported")
    pre_name = meta.get("tokenizer.ggml.pre", "gpt-2")
    pre_name = PRE_ALIASES.get(pre_name, pre_name)
    if pre_name not in PRE_TOKENIZERS:
        raise ConfigError(f"{where}: field 'tokenizer.ggml.pre' = {pre_name!r}: supported pre-tokenizers "
                          f"are {', '.join(sorted(set(PRE_TOKENIZERS) | set(PRE_ALIASES)))}")
    pre_tokenizer, ignore_merges, bos_default = PRE_TOKENIZERS[pre_name]
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    merges = [merge.split(" ", 1) for merge in meta.get("tokenizer.ggml.merges", [])]
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind == CONTROL}
             for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]

    def special(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None

    bos = special("bos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", bos_default)) and bos is not None
    post_processor = None
    if add_bos:
        bos_id = tokens.index(bos)
        post_processor = {"type": "TemplateProcessing",
                          "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                          "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                   {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                          "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    document = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges,
                  "vocab": {token: i for i, token in enumerate(tokens)}, "merges": merges},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": bos, "eos_token": special("eos"), "pad_token": special("padding"),
              "unk_token": special("unknown"), "add_bos_token": add_bos,
              "model_max_length": meta.get("context_length") or 2**20}
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return json.dumps(document, ensure_ascii=False), config


def pre_tokenizer_name(document: dict, where: str) -> str:
    """The llama.cpp name (`tokenizer.ggml.pre`) of a tokenizer.json's pre-tokenizer."""
    found = _signature(document.get("pre_tokenizer"))
    for name, (pre_tokenizer, _, _) in PRE_TOKENIZERS.items():
        if _signature(pre_tokenizer) == found:
            return name
    raise ConfigError(f"{where}: its pre-tokenizer ({json.dumps(document.get('pre_tokenizer'))[:200]}) "
                      f"splits text as none of llama.cpp's pre-tokenizers this export knows "
                      f"({', '.join(PRE_TOKENIZERS)}); llama.cpp would tokenise differently")


def _signature(pre: Any) -> Any:
    """What decides how a pre-tokenizer splits: its parts' kinds, regexes and flags, not the
    offsets bookkeeping (trim_offsets) or how the JSON spells them."""
    if not isinstance(pre, dict):
        return None
    kind = pre.get("type")
    if kind == "Sequence":
        parts = [_signature(p) for p in pre.get("pretokenizers", [])]
        return parts[0] if len(parts) == 1 else tuple(parts)
    if kind == "ByteLevel":
        return ("ByteLevel", bool(pre.get("add_prefix_space")), bool(pre.get("use_regex", True)))
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return ("Split", pattern.get("Regex", pattern.get("String")), str(pre.get("behavior")).lower(),
                bool(pre.get("invert")))
    if kind == "Digits":
        return ("Digits", bool(pre.get("individual_digits")))
    return (kind, json.dumps(pre, sort_keys=True))


def metadata_from_tokenizer(document: dict, config: dict, vocab_size: int, where: str) -> dict[str, Any]:
    """GGUF `tokenizer.*` fields for a byte-level BPE tokenizer.json (with its tokenizer_config.json):
    tokens in id order padded to the model's `vocab_size`, merges, token types, special ids."""
    model = document.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(f"{where}: a {model.get('type')} tokenizer; GGUF export supports byte-level "
                          f"BPE tokenizers (the 'gpt2' model llama.cpp knows)")
    pre = pre_tokenizer_name(document, where)
    by_id: dict[int, str] = {i: token for token, i in model.get("vocab", {}).items()}
    kinds: dict[int, int] = {}
    for entry in document.get("added_tokens", []):
        by_id[entry["id"]] = entry["content"]
        kinds[entry["id"]] = CONTROL if entry.get("special") else USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise ConfigError(f"{where}: token id {max(by_id)} is outside the model's vocabulary of {vocab_size}")
    # The embedding may have more rows than the tokenizer has tokens (padded vocabularies):
    # llama.cpp needs one entry per row, so the rest are unused placeholders (as its converter
    # names them).
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [kinds.get(i, NORMAL if i in by_id else UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {token: i for i, token in enumerate(tokens)}

    def token_id(name: str) -> int | None:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        return ids.get(value) if isinstance(value, str) else None

    fields: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                              "tokenizer.ggml.merges": merges}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"),
                      ("unknown", "unk_token")):
        if token_id(name) is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = token_id(name)
    processor = document.get("post_processor") or {}
    adds_bos = processor.get("type") == "TemplateProcessing" and "SpecialToken" in processor.get("single", [{}])[0]
    fields["tokenizer.ggml.add_bos_token"] = bool(config.get("add_bos_token", adds_bos))
    fields["tokenizer.ggml.add_eos_token"] = False
    if isinstance(config.get("chat_template"), str):
        fields["tokenizer.chat_template"] = config["chat_template"]
    return fields
