"""Post-training of one member: block expansion, SVD-LLM v2 compression, GRPO (SPEC section 3)."""

from familial.posttrain.compress import compress_member, merge_low_rank
from familial.posttrain.expand import (
    expand_member, freeze_except, frozen_parameter_patterns, trainable_parameter_patterns)

__all__ = ["compress_member", "expand_member", "freeze_except", "frozen_parameter_patterns",
           "merge_low_rank", "trainable_parameter_patterns"]
