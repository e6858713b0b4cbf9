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

from familial.data.provenance import sha256_of
from familial.data.shards import ShardWriter, TokenShards
from familial.data.tokenize import encode_texts, load_tokenizer, token_id, tokenizer_file, vocab_size
from familial.data.tokenizer_train import save_tokenizer, train_bpe

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_PATH = ASSETS / "tokenizer.json"
TOKENIZER_CONFIG_PATH = ASSETS / "tokenizer_config.json"
DEMO_VOCAB_SIZE = 2048
DEFAULT_LIMIT_BYTES = 4_000_000
HELD_OUT_EVERY = 20
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings",
               "_bundled"}
_MAX_FILE_BYTES = 100_000


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _SKIP_PARTS)
        files.extend(Path(directory) / name for name in names if name.endswith(".py"))
    files = [path for path in files if path.stat().st_size <= _MAX_FILE_BYTES]
    return sorted(files, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode())
                  .hexdigest())


def demo_documents(limit_bytes: int = DEFAULT_LIMIT_BYTES,
                   held_out_every: int = HELD_OUT_EVERY) -> tuple[list[str], list[str]]:
    """(train, held_out) documents: standard library files up to `limit_bytes` in total,
    every `held_out_every`-th of them held out."""
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
    held_out = documents[held_out_every - 1::held_out_every]
    train = [text for index, text in enumerate(documents)
             if index % held_out_every != held_out_every - 1]
    if not train or not held_out:
        raise ValueError(f"the standard library at {sysconfig.get_paths()['stdlib']} gave too "
                         f"little text for the demo corpus ({used} bytes)")
    return train, held_out


def prepare_demo_data(out_dir: str | Path, limit_bytes: int = DEFAULT_LIMIT_BYTES,
                      overwrite: bool = False, tokenizer_path: str | Path = TOKENIZER_PATH,
                      held_out_every: int = HELD_OUT_EVERY) -> tuple[TokenShards, TokenShards]:
    """Tokenise the demo corpus into `out_dir/train` and `out_dir/held_out` shards."""
    out_dir = Path(out_dir)
    file = tokenizer_file(tokenizer_path)
    tokenizer = load_tokenizer(file)
    eos = token_id(tokenizer, "<|endoftext|>", str(tokenizer_path))
    train, held_out = demo_documents(limit_bytes, held_out_every)
    result = []
    for name, texts in (("train", train), ("held_out", held_out)):
        writer = ShardWriter(out_dir / name, vocab_size(tokenizer), tokenizer=str(file.resolve()),
                             eos_token_id=eos, sources=[f"python-stdlib:{name}"],
                             overwrite=overwrite, tokenizer_sha256=sha256_of(file))
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


def train_demo_tokenizer(out_dir: str | Path = ASSETS, vocab: int = DEMO_VOCAB_SIZE,
                         limit_bytes: int = DEFAULT_LIMIT_BYTES, overwrite: bool = True) -> Path:
    """Fit the byte-level BPE tokenizer to the demo corpus's training part; write it to `out_dir`."""
    train, _ = demo_documents(limit_bytes)
    save_tokenizer(train_bpe(train, vocab), out_dir, overwrite=overwrite)
    return Path(out_dir) / TOKENIZER_PATH.name


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="retrain the shipped demo tokenizer")
    parser.add_argument("--out", default=str(ASSETS))
    written = train_demo_tokenizer(parser.parse_args().out)
    print(f"wrote {written} and {written.parent / TOKENIZER_CONFIG_PATH.name}")
