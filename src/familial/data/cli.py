"""`familial data prepare | merge | info | demo`: token shards from text, JSONL, parquet and chat.

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

from familial.data import chat
from familial.data.readers import FORMATS


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="tokenise inputs into token shards")
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
    merge = actions.add_parser("merge", help="join shard directories (the parts of a "
                               "`prepare --shard` run) into one")
    merge.add_argument("out", metavar="OUT", help="shard directory to write")
    merge.add_argument("inputs", nargs="+", metavar="PART",
                       help="shard directories: the parts of a --shard run, in any order")
    merge.add_argument("--held-out", type=float, default=0.0,
                       help="fraction of documents written to OUT/held_out")
    merge.add_argument("--overwrite", action="store_true")
    info = actions.add_parser("info", help="show a shard directory's (or Megatron dataset's) "
                              "manifest and counts")
    info.add_argument("shards")
    demo = actions.add_parser("demo", help="write the demo corpus's train and held-out shards")
    demo.add_argument("out")
    demo.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.action == "info":
        from familial.data.shards import open_shards

        print(json.dumps(open_shards(args.shards).manifest, indent=2))
        return 0
    if args.action == "demo":
        from familial.data.demo_corpus import prepare_demo_data
        from familial.data.prepare import report

        written = prepare_demo_data(args.out, overwrite=args.overwrite)
        for name, shards in zip(("train", "held_out"), written):
            report(name, shards)
        return 0
    if args.action == "merge":
        from familial.data.merge import merge

        return merge(args)
    from familial.data.prepare import prepare

    return prepare(args)
