"""familial: train once, deploy many. One transformer, several members sharing its weights."""

from familial.config import ConfigError, FamilyConfig
from familial.model import FamilyMember, FamilyModel

__all__ = ["ConfigError", "FamilyConfig", "FamilyMember", "FamilyModel"]
__version__ = "0.1.0"
