"""Data pipeline: token shards on disk, tokenising text and chat, batches and mixtures.

The names below load on first use: tokenising worker processes import only what they
run, not torch (which `batches` needs).
"""

import importlib

_EXPORTS = {
    "familial.data.batches": ["IGNORE_INDEX", "Batches", "ConversationBatches", "DocumentRows",
                              "PackedBatches", "StreamRows", "eval_batches"],
    "familial.data.mixture": ["MixtureRows", "mixture_batches"],
    "familial.data.shards": ["Document", "ShardError", "ShardWriter", "TokenShards",
                             "open_shards", "write_shards"],
}
_MODULES = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["IGNORE_INDEX", "Batches", "ConversationBatches", "Document", "DocumentRows",
           "MixtureRows", "PackedBatches", "ShardError", "ShardWriter", "StreamRows",
           "TokenShards", "eval_batches", "mixture_batches", "open_shards", "write_shards"]


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'familial.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
