"""Turning text into token ids with a HF `tokenizers` file, and finding the input files.

Every document gets the EOS token appended, so packed rows show the model where one
document ends and the next begins. How each input format is read is `readers`' concern.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from familial.text import counted

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
ENCODE_BATCH = 256


# The tokenizer shipped with the package (byte-level BPE fitted to the demo corpus, ChatML
# special tokens), which `--tokenizer demo` names.
SHIPPED_TOKENIZER = Path(__file__).parent / "assets"


def tokenizer_path(name: str | Path) -> Path:
    """`demo` -> the shipped tokenizer's directory (unless a file of that name exists here)."""
    path = Path(name)
    return SHIPPED_TOKENIZER if str(name) == "demo" and not path.exists() else path


def tokenizer_file(path: str | Path) -> Path:
    """tokenizer.json itself, or the one inside a checkpoint directory ('demo': the shipped one)."""
    file = tokenizer_path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json there (pass a HF tokenizers file "
                                f"or a checkpoint directory that contains one)")
    return file


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizers` tokenizer from tokenizer.json or a directory that holds one."""
    file = tokenizer_file(path)
    return tokenizer_from_json(file.read_bytes(), file)


def tokenizer_from_json(data: bytes, where: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:
        raise ValueError(f"{where}: not a readable HF tokenizers file ({error})") from None


def token_id(tokenizer: Tokenizer, token: str, where: str = "tokenizer") -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"{where}: has no token {token!r}")
    return found


def default_eos(tokenizer: Tokenizer) -> str | None:
    """The document separator a pre-training corpus conventionally uses for this vocabulary."""
    return next((token for token in EOS_CANDIDATES if tokenizer.token_to_id(token) is not None),
                None)


def vocab_size(tokenizer: Tokenizer) -> int:
    return tokenizer.get_vocab_size(with_added_tokens=True)


def expand_inputs(inputs: Iterable[str | Path], pattern: str = "*.txt") -> list[Path]:
    """Files as given, directories expanded to their files matching `pattern`, sorted."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob(pattern) if p.is_file())
            if not found:
                others = sum(1 for p in item.rglob("*") if p.is_file())
                raise FileNotFoundError(f"{item}: directory has no files matching --glob "
                                        f"{pattern!r} (it holds {counted(others, 'file')} in all); "
                                        f"pass --glob '*' to take every file, or another pattern")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    return files


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def encode_texts(tokenizer: Tokenizer, texts: Iterable[str], eos_token_id: int | None,
                 batch_size: int = ENCODE_BATCH) -> Iterator[np.ndarray]:
    """Token ids per text (EOS appended), encoded in batches so `tokenizers` can use threads."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from _encode_batch(tokenizer, batch, eos_token_id)
            batch = []
    if batch:
        yield from _encode_batch(tokenizer, batch, eos_token_id)


def _encode_batch(tokenizer: Tokenizer, texts: list[str],
                  eos_token_id: int | None) -> Iterator[np.ndarray]:
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = encoding.ids + ([eos_token_id] if eos_token_id is not None else [])
        if ids:
            yield np.asarray(ids, dtype=np.int64)
