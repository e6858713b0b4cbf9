"""`familial data merge OUT IN...`: token shard directories joined into one.

Parts written by `data prepare --shard I/N` are joined in shard order, whatever order
they are given in, after checking that all N are there and were prepared from the same
inputs; other shard directories are joined in the order given. Either way the parts must
agree on vocabulary, EOS token and tokenizer (by the sha256 of its file). `--held-out`
splits the merged documents exactly as one pass of `data prepare --held-out` would.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from familial.data.prepare import SplitWriter, report
from familial.data.shards import ShardError, TokenShards

BLOCK_TOKENS = 1 << 24
AGREE = ("vocab_size", "eos_token_id", "tokenizer_sha256")


def merge(args: argparse.Namespace) -> int:
    parts = in_order([TokenShards(path) for path in args.inputs])
    first = parts[0].manifest
    for part in parts[1:]:
        for key in AGREE:
            if part.manifest.get(key) != first.get(key):
                raise ShardError(f"{part.path}: {key} is {part.manifest.get(key)!r} but "
                                 f"{parts[0].path} has {first.get(key)!r}; only parts "
                                 f"tokenised alike can be merged")
    sharded = "shard" in first
    sources = first["sources"] if sharded else list(dict.fromkeys(
        source for part in parts for source in part.manifest["sources"]))
    out = SplitWriter(Path(args.out), args.held_out, vocab_size=first["vocab_size"],
                      tokenizer=first["tokenizer"], eos_token_id=first["eos_token_id"],
                      sources=sources, overwrite=args.overwrite,
                      tokenizer_sha256=first.get("tokenizer_sha256"))
    try:
        for part in parts:
            for tokens, lengths, mask in _blocks(part):
                out.add_batch(tokens, lengths, mask)
        written = out.commit()
    except BaseException:
        out.discard()
        raise
    for name, shards in written:
        report(name, shards)
    return 0


def in_order(parts: list[TokenShards]) -> list[TokenShards]:
    """Parts of one sharded run sorted by shard index, checked complete; others as given."""
    shards = [part.manifest.get("shard") for part in parts]
    if all(shard is None for shard in shards):
        return parts
    sharded = next(part for part, shard in zip(parts, shards) if shard is not None)
    for part, shard in zip(parts, shards):
        if shard is None:
            raise ShardError(f"{part.path}: not a part written by `data prepare --shard`, "
                             f"unlike {sharded.path}")
        if shard.get("count") != shards[0].get("count"):
            raise ShardError(f"{part.path}: shard {shard.get('index')}/{shard.get('count')} "
                             f"is not one of {shards[0].get('count')} parts like "
                             f"{parts[0].path}")
        names = [Path(source).name for source in part.manifest["sources"]]
        if names != [Path(source).name for source in parts[0].manifest["sources"]]:
            raise ShardError(f"{part.path}: prepared from other inputs than {parts[0].path} "
                             f"(the manifests' 'sources' differ)")
    count = shards[0]["count"]
    indices = [shard["index"] for shard in shards]
    for index in range(count):
        if indices.count(index) != 1:
            state = "missing" if index not in indices else "given twice"
            raise ShardError(f"shard {index}/{count} is {state} (merge needs each of the "
                             f"{count} parts once)")
    return [part for _, part in sorted(zip(indices, parts), key=lambda pair: pair[0])]


def _blocks(part: TokenShards) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(tokens, document lengths, loss mask or None) of whole documents, about
    BLOCK_TOKENS at a time."""
    offsets = part.documents
    document = 0
    while document < part.num_documents:
        stop = int(np.searchsorted(offsets, offsets[document] + BLOCK_TOKENS, side="right")) - 1
        stop = max(stop, document + 1)
        begin, end = int(offsets[document]), int(offsets[stop])
        mask = None if part.loss_mask is None else np.asarray(part.loss_mask[begin:end])
        yield (np.asarray(part.tokens[begin:end]), np.diff(offsets[document:stop + 1]), mask)
        document = stop
