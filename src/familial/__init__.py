"""familial: train once, deploy many. One transformer, several members sharing its weights.

The names below load on first use, so `familial.data`'s tokenising worker processes and
commands that never build a model do not pay for importing torch.
"""

import importlib

_EXPORTS = {"ConfigError": "familial.config", "FamilyConfig": "familial.config",
            "FamilyMember": "familial.model", "FamilyModel": "familial.model"}

__all__ = ["ConfigError", "FamilyConfig", "FamilyMember", "FamilyModel"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'familial' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
