"""The demo's corpus and tokenizer: real text that every Python installation already has.

The corpus is the Python standard library's own source code (`*.py` under
`sysconfig.get_paths()["stdlib"]`, without test suites, generated codec tables and files
over 100 KB). Files are taken in the order of a hash of their relative path, which mixes
packages while staying the same on every machine, as long as they fit in `limit_bytes`
(UTF-8); every 20th file taken is held out for evaluation. The standard library differs a
little between Python versions, so corpus and losses differ slightly between them too; on
one interpreter they are fixed.

The tokenizer (byte-level BPE, 2048 ids, special tokens `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>` at ids 0-2, Qwen's pre-tokenizer split) ships in `assets/` next to this file with
a tokenizer_config.json holding the ChatML template; it was trained on this corpus under
Python 3.11 with `python -m familial.data.demo_corpus` and encodes any text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sysconfig
from pathlib import Path

from tqdm import tqdm

from familial.chat_template import CHATML
from familial.data.shards import ShardWriter, TokenShards
from familial.data.tokenize import encode_texts, load_tokenizer, token_id, vocab_size

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_PATH = ASSETS / "tokenizer.json"
TOKENIZER_CONFIG_PATH = ASSETS / "tokenizer_config.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEMO_VOCAB_SIZE = 2048
DEFAULT_LIMIT_BYTES = 4_000_000
HELD_OUT_EVERY = 20
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings",
               "_bundled"}
_MAX_FILE_BYTES = 100_000
# The pre-tokenizer regex of Qwen2/Qwen3: single digits, words with their leading space,
# runs of punctuation and whitespace kept apart, so code indentation becomes few tokens.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _SKIP_PARTS)
        files.extend(Path(directory) / name for name in names if name.endswith(".py"))
    files = [path for path in files if path.stat().st_size <= _MAX_FILE_BYTES]
    return sorted(files, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode())
                  .hexdigest())


def demo_documents(limit_bytes: int = DEFAULT_LIMIT_BYTES) -> tuple[list[str], list[str]]:
    """(train, held_out) documents: standard library files up to `limit_bytes` in total."""
    documents: list[str] = []
    used = 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if used + size <= limit_bytes:
            documents.append(text)
            used += size
    held_out = documents[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    train = [text for index, text in enumerate(documents)
             if index % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    if not train or not held_out:
        raise ValueError(f"the standard library at {sysconfig.get_paths()['stdlib']} gave too "
                         f"little text for the demo corpus ({used} bytes)")
    return train, held_out


def prepare_demo_data(out_dir: str | Path, limit_bytes: int = DEFAULT_LIMIT_BYTES,
                      overwrite: bool = False) -> tuple[TokenShards, TokenShards]:
    """Tokenise the demo corpus into `out_dir/train` and `out_dir/held_out` shards."""
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(TOKENIZER_PATH)
    eos = token_id(tokenizer, "<|endoftext|>", str(TOKENIZER_PATH))
    train, held_out = demo_documents(limit_bytes)
    result = []
    for name, texts in (("train", train), ("held_out", held_out)):
        writer = ShardWriter(out_dir / name, vocab_size(tokenizer), tokenizer=str(TOKENIZER_PATH),
                             eos_token_id=eos, sources=[f"python-stdlib:{name}"],
                             overwrite=overwrite)
        try:
            for ids in tqdm(encode_texts(tokenizer, texts, eos), total=len(texts),
                            desc=f"tokenising demo corpus ({name})", unit="file"):
                writer.add(ids)
        except BaseException:
            writer.discard()
            raise
        result.append(writer.commit())
    return result[0], result[1]


def arithmetic_conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Small chat examples (addition and multiplication questions) with exact answers."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op, value = rng.choice([("+", a + b), ("*", a * b)])
        messages = [{"role": "user", "content": f"What is {a} {op} {b}?"},
                    {"role": "assistant", "content": f"{a} {op} {b} = {value}"}]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": "You are a careful calculator."})
        conversations.append(messages)
    return conversations


def write_arithmetic_chat(path: str | Path, count: int, seed: int = 0) -> Path:
    """Write `arithmetic_conversations` as chat JSONL (`{"messages": [...]}` per line)."""
    path = Path(path)
    path.write_text("".join(json.dumps({"messages": messages}) + "\n"
                            for messages in arithmetic_conversations(count, seed)))
    return path


def train_demo_tokenizer(out_path: str | Path = TOKENIZER_PATH,
                         vocab: int = DEMO_VOCAB_SIZE) -> Path:
    """Train the byte-level BPE tokenizer on the demo corpus's training part and save it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    train, _ = demo_documents()
    tokenizer.train_from_iterator(train, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    write_tokenizer_config(out_path.parent / TOKENIZER_CONFIG_PATH.name)
    return out_path


def write_tokenizer_config(path: str | Path = TOKENIZER_CONFIG_PATH) -> Path:
    """tokenizer_config.json so that transformers loads the demo tokenizer and chat template."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "model_max_length": 32768, "clean_up_tokenization_spaces": False,
              "chat_template": CHATML}
    path = Path(path)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="retrain the shipped demo tokenizer")
    parser.add_argument("--out", default=str(TOKENIZER_PATH))
    written = train_demo_tokenizer(parser.parse_args().out)
    print(f"wrote {written} and {written.parent / TOKENIZER_CONFIG_PATH.name}")
