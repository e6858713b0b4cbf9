"""`familial tokenizer train`: a byte-level BPE tokenizer fitted to a new corpus.

    familial tokenizer train FILE_OR_DIR... --vocab-size N --out DIR [--glob "*.txt"]

The shipped tokenizer was fitted to Python source; on English it needs about 2.2 characters
per token, so a model trained on English with it wastes most of its context and compute.
This command fits the same kind of tokenizer to any text: byte-level BPE (`tokenizers`),
so every string encodes without an unknown token; Qwen's pre-tokenizer split (single
digits, words with their leading space, punctuation and whitespace runs apart); special
tokens `<|endoftext|>` (document separator), `<|im_start|>` and `<|im_end|>` (ChatML turns)
at ids 0-2, as in the shipped tokenizer. DIR gets tokenizer.json and a tokenizer_config.json
with the ChatML template, so `familial data prepare --tokenizer DIR` (also for chat data)
and transformers' `AutoTokenizer.from_pretrained(DIR)` both take it. Inputs are read as
`data prepare` reads them: a text file is one document; JSONL (plain, .gz, .zst) and parquet
give one document per record's "text" field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from familial.chat_template import CHATML
from familial.staging import atomic_directory, naming
from familial.data.encode import chunk_texts
from familial.data.readers import CHUNK_BYTES, ReadOptions, chunks, plan
from familial.data.tokenize import expand_inputs

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Byte-level BPE starts from the 256 byte symbols; the vocabulary must hold them and the
# special tokens before any merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 1 << 20
# The pre-tokenizer regex of Qwen2/Qwen3: single digits, words with their leading space,
# runs of punctuation and whitespace kept apart, so code indentation becomes few tokens.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def check_settings(vocab_size: int, min_frequency: int) -> None:
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"--vocab-size {vocab_size}: expected {MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE} "
                         f"(the 256 byte symbols and {len(SPECIAL_TOKENS)} special tokens come first)")
    if min_frequency < 1:
        raise ValueError(f"--min-frequency {min_frequency}: expected a positive integer")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Fit a byte-level BPE tokenizer with up to `vocab_size` ids (special tokens included).

    A corpus with too few distinct pairs stops early, with a smaller vocabulary.
    """
    check_settings(vocab_size, min_frequency)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=min_frequency, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenizer_config() -> dict:
    """tokenizer_config.json: lets transformers load the tokenizer with its chat template."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
            "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "model_max_length": 32768, "clean_up_tokenization_spaces": False,
            "chat_template": CHATML}


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write DIR/tokenizer.json and DIR/tokenizer_config.json together (or nothing)."""
    files = {"tokenizer.json": tokenizer.to_str(pretty=True),
             "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2) + "\n"}
    with atomic_directory(out_dir, overwrite) as staging:
        for name, text in files.items():
            # Written here rather than by `tokenizers`, whose failures (a full disk) are bare
            # Exceptions without the file's name.
            with naming(Path(out_dir) / name), open(staging / name, "w", encoding="utf-8") as handle:
                handle.write(text)
    return Path(out_dir)


def corpus_texts(inputs: list[str], glob: str = "*.txt", text_field: str = "text") -> Iterator[str]:
    """Documents of the inputs in input order, read as `data prepare` reads them: a text file
    is one document, JSONL (plain, .gz, .zst) and parquet one per record's `text_field`."""
    options = ReadOptions(text_field, None, CHUNK_BYTES)
    for chunk in chunks(plan(expand_inputs(inputs, glob), "auto"), options):
        if chunk.kind == "chat":
            raise ValueError(f"{chunk.where}: chat records (`messages`); fit the tokenizer to "
                             f"plain text or JSONL with a '{text_field}' field")
        yield from chunk_texts(chunk, text_field)
