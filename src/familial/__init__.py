"""familial: train once, deploy many. One transformer, several members sharing its weights."""

from familial.config import ConfigError, FamilyConfig

__all__ = ["ConfigError", "FamilyConfig", "FamilyMember", "FamilyModel"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The model (and torch) load on first use, so torch-free parts such as the chat-template
    # worker of the server start in a fraction of a second.
    if name in ("FamilyMember", "FamilyModel"):
        from familial import model

        return getattr(model, name)
    raise AttributeError(f"module 'familial' has no attribute {name!r}")
