"""Data pipeline: token shards on disk, tokenising text and chat, batches and mixtures."""

from familial.data.batches import (IGNORE_INDEX, Batches, ConversationBatches, DocumentRows,
                                   PackedBatches, StreamRows, eval_batches)
from familial.data.mixture import MixtureRows, mixture_batches
from familial.data.shards import Document, ShardError, ShardWriter, TokenShards, write_shards

__all__ = ["IGNORE_INDEX", "Batches", "ConversationBatches", "Document", "DocumentRows",
           "MixtureRows", "PackedBatches", "ShardError", "ShardWriter", "StreamRows",
           "TokenShards", "eval_batches", "mixture_batches", "write_shards"]
