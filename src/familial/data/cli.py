"""`familial data prepare | info | demo`: token shards from text, JSONL and chat JSONL.

    familial data prepare INPUT... --tokenizer tokenizer.json --out DIR
        [--format auto|text|jsonl|chat] [--chat-template FILE|chatml] [--held-out 0.01]

Formats: `text` (each file one document; directories expand to files matching --glob),
`jsonl` (one `{"text": ...}` per line), `chat` (one `{"messages": [{role, content}...]}`
per line, loss on assistant turns only). `auto` picks per file: .jsonl/.json files whose
first record has `messages` are chat, other .jsonl/.json are jsonl, the rest text. Chat
uses `--chat-template`, else the `chat_template` of tokenizer_config.json when --tokenizer
is a checkpoint directory, else ChatML. With `--held-out F` an evenly spread fraction F of
the documents goes to DIR/held_out and the rest to DIR/train.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from familial.data import chat
from familial.data.shards import Document, ShardWriter, TokenShards
from familial.data.tokenize import (default_eos, encode_texts, expand_inputs, load_tokenizer,
                                    read_jsonl, read_jsonl_texts, read_text_file, token_id,
                                    tokenizer_path, vocab_size)

FORMATS = ("auto", "text", "jsonl", "chat")


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="tokenise inputs into token shards")
    prepare.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories")
    prepare.add_argument("--tokenizer", required=True,
                         help="tokenizer.json, a checkpoint directory that holds one, or 'demo' "
                              "for the shipped tokenizer (trained on Python code)")
    prepare.add_argument("--out", required=True, help="shard directory to write")
    prepare.add_argument("--format", choices=FORMATS, default="auto")
    prepare.add_argument("--text-field", default="text", help="JSONL field holding the text")
    prepare.add_argument("--glob", default="*.txt", help="files to take from input directories")
    prepare.add_argument("--chat-template", help="a .jinja file, a tokenizer_config.json, or "
                         "'chatml' for the built-in ChatML")
    prepare.add_argument("--end-of-turn", default=chat.END_OF_TURN,
                         help="token closing each turn of a custom chat template")
    prepare.add_argument("--eos-token", help="token appended to text documents "
                         "(default: <|endoftext|> or the tokenizer's usual EOS)")
    prepare.add_argument("--held-out", type=float, default=0.0,
                         help="fraction of documents written to OUT/held_out")
    prepare.add_argument("--overwrite", action="store_true")
    info = actions.add_parser("info", help="show a shard directory's manifest and counts")
    info.add_argument("shards")
    demo = actions.add_parser("demo", help="write the demo corpus's train and held-out shards")
    demo.add_argument("out")
    demo.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.action == "info":
        shards = TokenShards(args.shards)
        print(json.dumps(shards.manifest, indent=2))
        return 0
    if args.action == "demo":
        from familial.data.demo_corpus import prepare_demo_data

        written = prepare_demo_data(args.out, overwrite=args.overwrite)
        for name, shards in zip(("train", "held_out"), written):
            _report(name, shards)
        return 0
    return prepare(args)


def prepare(args: argparse.Namespace) -> int:
    if not 0.0 <= args.held_out < 1.0:
        raise ValueError(f"--held-out must be a fraction in [0, 1), got {args.held_out}")
    args.tokenizer = str(tokenizer_path(args.tokenizer))
    tokenizer = load_tokenizer(args.tokenizer)
    eos_name = args.eos_token or default_eos(tokenizer)
    eos = token_id(tokenizer, eos_name, args.tokenizer) if eos_name else None
    files = expand_inputs(args.inputs, args.glob)
    formats = [_detect(file) if args.format == "auto" else args.format for file in files]
    template, special = _chat_template(args) if "chat" in formats else (None, {})
    if "chat" in formats:
        token_id(tokenizer, args.end_of_turn if template else chat.END_OF_TURN, args.tokenizer)
    names = ["train", "held_out"] if args.held_out else [None]
    out = Path(args.out)
    writers: list[ShardWriter] = []
    try:
        for name in names:
            writers.append(ShardWriter(
                out / name if name else out, vocab_size(tokenizer),
                tokenizer=str(Path(args.tokenizer).resolve()), eos_token_id=eos,
                sources=[str(file) for file in files], overwrite=args.overwrite))
        documents = _documents(files, formats, tokenizer, eos, template, special, args)
        bar = tqdm(documents, desc="tokenising", unit="doc",
                   total=len(files) if set(formats) == {"text"} else None)
        for index, document in enumerate(bar):
            writers[1 if _held_out(index, args.held_out) else 0].add(document)
            if index % 256 == 0:
                bar.set_postfix(tokens=sum(w.num_tokens for w in writers))
        bar.close()
        empty = [name for name, writer in zip(names, writers) if writer.num_documents == 0]
        if empty:
            raise ValueError(f"{out}: no documents for {empty[0]} (the inputs hold "
                             f"{sum(w.num_documents for w in writers)} documents; lower "
                             f"--held-out or add data)")
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    for name, writer in zip(names, writers):
        _report(name or "shards", writer.commit())
    return 0


def _held_out(index: int, fraction: float) -> bool:
    """True for an evenly spread `fraction` of document indices (none when it is 0)."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def _report(name: str, shards: TokenShards) -> None:
    targets = shards.num_tokens if shards.loss_mask is None else int(shards.loss_mask.sum())
    print(f"{name}: {shards.num_documents:,} documents, {shards.num_tokens:,} tokens "
          f"({targets:,} training targets) -> {shards.path}")


def _detect(file: Path) -> str:
    if file.suffix not in (".jsonl", ".json"):
        return "text"
    for _, record in read_jsonl(file):
        return "chat" if isinstance(record, dict) and "messages" in record else "jsonl"
    raise ValueError(f"{file}: empty JSONL file")


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


def _documents(files, formats, tokenizer, eos, template, special,
               args) -> Iterator[Document | np.ndarray]:
    # Consecutive text files are encoded together so `tokenizers` can batch them.
    for kind, group in itertools.groupby(zip(files, formats), key=lambda pair: pair[1]):
        group_files = [file for file, _ in group]
        if kind == "text":
            yield from encode_texts(tokenizer, map(read_text_file, group_files), eos)
        elif kind == "jsonl":
            for file in group_files:
                yield from encode_texts(tokenizer, read_jsonl_texts(file, args.text_field), eos)
        else:
            for file in group_files:
                for number, messages in chat.read_chat_jsonl(file):
                    yield chat.encode_chat(tokenizer, messages, template, args.end_of_turn,
                                           special, where=f"{file}:{number}")
