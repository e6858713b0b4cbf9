"""`familial data prepare`: inputs to token shards, in one pass or as one part of N.

The inputs are read as chunks in order (`readers`), encoded by one or N processes
(`encode`), and written in that order, so the output depends on neither the number of
workers nor how the inputs fall into chunks. With `--shard I/N` this run writes the I-th of
N parts of the corpus; `familial data merge` joins the parts into what one pass writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from familial.data import chat, readers
from familial.data.encode import EncodeSpec, encode_chunks
from familial.data.shards import ShardError, ShardWriter, TokenShards, dtype_for_vocab
from familial.data.tokenize import (default_eos, expand_inputs, token_id, tokenizer_file,
                                    tokenizer_from_json, tokenizer_path, vocab_size)

PROGRESS_DELAY = 2.0   # seconds before the progress bar shows: quick runs stay quiet


class SplitWriter:
    """Documents into OUT, or into OUT/train and OUT/held_out when a fraction is held out.

    Document i is held out when floor((i + 1) f) > floor(i f): an evenly spread fraction f
    that depends on i alone, so one pass, any number of workers, and parts merged later all
    make the same split.
    """

    def __init__(self, out: Path, held_out: float, **writer_options: Any) -> None:
        if not 0.0 <= held_out < 1.0:
            raise ValueError(f"--held-out must be a fraction in [0, 1), got {held_out}")
        self.out, self.fraction, self.count = out, held_out, 0
        self.names = ["train", "held_out"] if held_out else [None]
        self.writers: list[ShardWriter] = []
        try:
            for name in self.names:
                self.writers.append(ShardWriter(out / name if name else out, **writer_options))
        except BaseException:
            self.discard()
            raise

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray,
                  loss_mask: np.ndarray | None = None) -> None:
        index = np.arange(self.count, self.count + lengths.size, dtype=np.float64)
        self.count += lengths.size
        held = np.floor((index + 1) * self.fraction) > np.floor(index * self.fraction)
        if not held.any():
            self.writers[0].add_batch(tokens, lengths, loss_mask)
            return
        per_token = np.repeat(held, lengths)
        for writer, documents, selected in ((self.writers[0], ~held, ~per_token),
                                            (self.writers[1], held, per_token)):
            writer.add_batch(tokens[selected], lengths[documents],
                             None if loss_mask is None else loss_mask[selected])

    def commit(self) -> list[tuple[str, TokenShards]]:
        for name, writer in zip(self.names, self.writers):
            if writer.num_documents == 0 and self.count:
                raise ShardError(f"{self.out}: no documents for {name} (the inputs hold "
                                 f"{self.count} documents; lower --held-out or add data)")
        return [(name or "shards", writer.commit())
                for name, writer in zip(self.names, self.writers)]

    def discard(self) -> None:
        for writer in self.writers:
            writer.discard()


class Progress:
    """Input bytes read (the bar and its ETA) and tokens per second, on stderr."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="tokenising", delay=PROGRESS_DELAY, disable=not enabled)
        self.start, self.done, self.tokens = time.monotonic(), 0, 0

    def update(self, position: int, tokens: int) -> None:
        self.tokens += tokens
        if position > self.done:
            self.bar.update(position - self.done)
            self.done = position
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"--shard must be I/N with 0 <= I < N (this machine's part of N), "
                         f"got {value!r}")
    return int(index), int(count)


def shard_range(shard: tuple[int, int] | None, total: int) -> tuple[int, float]:
    """The positions [lo, hi) of part I of N; the last part also takes position `total`,
    where empty files at the very end lie."""
    if shard is None:
        return 0, float("inf")
    index, count = shard
    return index * total // count, (float("inf") if index == count - 1
                                    else (index + 1) * total // count)


def prepare(args: argparse.Namespace) -> int:
    shard = parse_shard(args.shard)
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if shard and args.held_out:
        raise ValueError("--held-out splits the whole corpus: with --shard, pass it to "
                         "`familial data merge` instead")
    args.tokenizer = str(tokenizer_path(args.tokenizer))
    file = tokenizer_file(args.tokenizer)
    tokenizer_json = file.read_bytes()
    tokenizer = tokenizer_from_json(tokenizer_json, file)
    eos_name = args.eos_token or default_eos(tokenizer)
    eos = token_id(tokenizer, eos_name, args.tokenizer) if eos_name else None
    files = expand_inputs(args.inputs, args.glob)
    inputs = readers.plan(files, args.format)
    spec = _encode_spec(args, {item.format for item in inputs}, tokenizer, tokenizer_json, eos)
    total = sum(item.size for item in inputs)
    lo, hi = shard_range(shard, total)
    out = SplitWriter(Path(args.out), args.held_out, vocab_size=vocab_size(tokenizer),
                      tokenizer=str(Path(args.tokenizer).resolve()), eos_token_id=eos,
                      sources=[str(file) for file in files], overwrite=args.overwrite,
                      tokenizer_sha256=hashlib.sha256(tokenizer_json).hexdigest(), shard=shard)
    written, blank = _write_all(args, spec, inputs, out, shard, (lo, hi), total)
    for name, shards in written:
        report(name, shards)
    if blank:
        print(f"left out {blank:,} blank documents")
    return 0


def _encode_spec(args: argparse.Namespace, formats: set[str], tokenizer: Any, tokenizer_json: bytes,
                 eos: int | None) -> EncodeSpec:
    """What each worker needs to encode a chunk, once the options that depend on the inputs'
    formats (a text separator, a chat template) are checked."""
    if args.separator is not None and (not args.separator or "text" not in formats):
        raise ValueError(f"--separator {args.separator!r} splits text files, and "
                         f"{'it is empty' if not args.separator else 'no input is text'}")
    template, special = _chat_template(args) if "chat" in formats else (None, {})
    if "chat" in formats:
        token_id(tokenizer, args.end_of_turn if template else chat.END_OF_TURN, args.tokenizer)
    return EncodeSpec(tokenizer_json, eos, args.text_field, dtype_for_vocab(vocab_size(tokenizer)), template,
                      args.end_of_turn, special)


def _write_all(args: argparse.Namespace, spec: EncodeSpec, inputs: list, out: SplitWriter,
               shard: tuple[int, int] | None, span: tuple[int, float], total: int) -> tuple[list, int]:
    """Encode the positions `span` of the inputs into `out` and commit it: (what was written,
    blank documents left out). On any failure nothing is left behind."""
    lo, hi = span
    blank = 0
    progress = Progress(int(min(hi, total) - lo), enabled=args.progress)
    try:
        options = readers.ReadOptions(args.text_field, args.separator, readers.CHUNK_BYTES)
        chunks = readers.chunks(inputs, options, lo, hi)
        for chunk, encoded in encode_chunks(spec, chunks, args.workers):
            out.add_batch(encoded.tokens, encoded.lengths, encoded.loss_mask)
            blank += encoded.blank
            progress.update(chunk.end - lo, encoded.tokens.size)
        if out.count == 0:
            raise ValueError(_no_documents(args.inputs, shard))
        written = out.commit()
    except BaseException:
        out.discard()
        raise
    finally:
        progress.close()
    return written, blank


def _no_documents(inputs: list[str], shard: tuple[int, int] | None) -> str:
    part = f" in shard {shard[0]}/{shard[1]}" if shard else ""
    named = " ".join(inputs[:3]) + (f" (+{len(inputs) - 3} more)" if len(inputs) > 3 else "")
    return (f"{named}: no documents{part} (the inputs are empty or blank"
            f"{'; use fewer shards' if shard else ''})")


def report(name: str, shards: TokenShards) -> None:
    targets = shards.num_tokens if shards.loss_mask is None else int(shards.loss_mask.sum())
    print(f"{name}: {shards.num_documents:,} documents, {shards.num_tokens:,} tokens "
          f"({targets:,} training targets) -> {shards.path}")


def _chat_template(args: argparse.Namespace) -> tuple[str | None, dict[str, str]]:
    if args.chat_template == "chatml":
        return None, {}
    if args.chat_template:
        return chat.load_chat_template(args.chat_template)
    config = Path(args.tokenizer) / "tokenizer_config.json"
    if config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8")):
        print(f"using the chat template of {config}")
        return chat.load_chat_template(config)
    return None, {}
