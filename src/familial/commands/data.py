"""`familial data prepare | merge | info | demo`: token shards from text, JSONL, parquet and chat;
`familial tokenizer train`: a tokenizer fitted to a corpus (`familial.data.tokenizer_train`).

    familial data prepare INPUT... --tokenizer tokenizer.json --out DIR
        [--format auto|text|jsonl|chat|parquet] [--column text] [--separator STR]
        [--chat-template FILE|chatml] [--held-out 0.01] [--workers N] [--shard I/N]
    familial data merge OUT PART... [--held-out 0.01]
    familial data info DIR|PREFIX

Formats: `text` (each file one document, or many split by `--separator`; directories
expand to files matching --glob), `jsonl` (one `{"text": ...}` per line, plain, .gz or
.zst), `chat` (one `{"messages": [{role, content}...]}` per line, loss on assistant turns
only), `parquet` (the `--column` of every row, read one row group at a time). `auto` picks
per file: .parquet is parquet, .jsonl/.json (maybe compressed) files whose first record has
`messages` are chat, other .jsonl/.json are jsonl, the rest text. Chat uses
`--chat-template`, else the `chat_template` of tokenizer_config.json when --tokenizer is a
checkpoint directory, else ChatML. With `--held-out F` an evenly spread fraction F of the
documents goes to DIR/held_out and the rest to DIR/train. `--workers N` tokenises in N
processes, with output identical to one; `--shard I/N` writes part I of N (one per machine)
and `data merge` joins the parts into what one pass would write. `info` also reads a
Megatron indexed dataset (PREFIX.bin + PREFIX.idx), which training reads as it is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from familial.commands import arguments
from familial.data import chat
from familial.data.readers import FORMATS


def _prepare_arguments(prepare: argparse.ArgumentParser) -> None:
    prepare.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories")
    prepare.add_argument("--tokenizer", required=True,
                         help="tokenizer.json, a checkpoint directory that holds one, or 'demo' "
                              "for the shipped tokenizer (trained on Python code)")
    prepare.add_argument("--out", required=True, help="shard directory to write")
    prepare.add_argument("--format", choices=FORMATS, default="auto")
    prepare.add_argument("--text-field", "--column", dest="text_field", default="text",
                         help="JSONL field or parquet column holding the text")
    prepare.add_argument("--separator", help="string between documents in text files; the "
                         "line break on each side of it goes with it (write --separator=--- "
                         "for one that starts with '-')")
    prepare.add_argument("--glob", default="*.txt", help="files to take from input directories "
                         "(default: %(default)s; '*' takes every file)")
    prepare.add_argument("--chat-template", help="a .jinja file, a tokenizer_config.json, or "
                         "'chatml' for the built-in ChatML")
    prepare.add_argument("--end-of-turn", default=chat.END_OF_TURN,
                         help="token closing each turn of a custom chat template")
    prepare.add_argument("--eos-token", help="token appended to text documents "
                         "(default: <|endoftext|> or the tokenizer's usual EOS)")
    prepare.add_argument("--held-out", type=float, default=0.0,
                         help="fraction of documents written to OUT/held_out")
    prepare.add_argument("--workers", type=int, default=1,
                         help="tokenising processes (1: this one, with the tokenizer's threads)")
    prepare.add_argument("--shard", metavar="I/N",
                         help="write only part I of N of the inputs (one part per machine; "
                         "join the parts with `familial data merge`)")
    prepare.add_argument("--no-progress", dest="progress", action="store_false",
                         help="no progress bar on stderr")
    prepare.add_argument("--overwrite", action="store_true")


@arguments(_prepare_arguments)
def prepare(args: argparse.Namespace) -> int:
    from familial.data.prepare import prepare as prepare_shards

    return prepare_shards(args)


def _merge_arguments(merge: argparse.ArgumentParser) -> None:
    merge.add_argument("out", metavar="OUT", help="shard directory to write")
    merge.add_argument("inputs", nargs="+", metavar="PART",
                       help="shard directories: the parts of a --shard run, in any order")
    merge.add_argument("--held-out", type=float, default=0.0,
                       help="fraction of documents written to OUT/held_out")
    merge.add_argument("--overwrite", action="store_true")


@arguments(_merge_arguments)
def merge(args: argparse.Namespace) -> int:
    from familial.data.merge import merge as merge_shards

    return merge_shards(args)


def _info_arguments(info: argparse.ArgumentParser) -> None:
    info.add_argument("shards")


@arguments(_info_arguments)
def info(args: argparse.Namespace) -> int:
    from familial.data.shards import open_shards

    print(json.dumps(open_shards(args.shards).manifest, indent=2))
    return 0


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("out")
    demo.add_argument("--overwrite", action="store_true")


@arguments(_demo_arguments)
def demo(args: argparse.Namespace) -> int:
    from familial.data.demo_corpus import prepare_demo_data
    from familial.data.prepare import report

    written = prepare_demo_data(args.out, overwrite=args.overwrite)
    for name, shards in zip(("train", "held_out"), written):
        report(name, shards)
    return 0


def _tokenizer_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("inputs", nargs="+", metavar="INPUT", help="text or .jsonl files, or directories")
    train.add_argument("--vocab-size", type=int, required=True, help="ids in all, special tokens included")
    train.add_argument("--out", required=True, help="directory to write tokenizer.json and "
                                                    "tokenizer_config.json into")
    train.add_argument("--glob", default="*.txt",
                       help="files to take from input directories (default: %(default)s; '*' takes every file)")
    train.add_argument("--text-field", default="text", help="JSONL field holding the text")
    train.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences of a merged pair")
    train.add_argument("--overwrite", action="store_true")


@arguments(_tokenizer_arguments)
def train_tokenizer(args: argparse.Namespace) -> int:
    """`familial tokenizer train` (see `familial.data.tokenizer_train`)."""
    from familial.data.tokenizer_train import check_settings, corpus_texts, save_tokenizer, train_bpe

    check_settings(args.vocab_size, args.min_frequency)
    out = Path(args.out)
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not empty (choose another --out, or pass "
                         f"--overwrite)")
    texts = list(corpus_texts(args.inputs, args.glob, args.text_field))
    if not any(text.strip() for text in texts):
        raise ValueError(f"{', '.join(args.inputs)}: no text to train on (the inputs are empty)")
    tokenizer = train_bpe(texts, args.vocab_size, args.min_frequency)
    save_tokenizer(tokenizer, out, args.overwrite)
    characters = sum(len(text) for text in texts)
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    print(f"trained on {len(texts):,} documents ({characters:,} characters): "
          f"{tokenizer.get_vocab_size():,} ids, {characters / max(tokens, 1):.2f} characters per token")
    print(f"wrote {out / 'tokenizer.json'} and {out / 'tokenizer_config.json'}")
    return 0
