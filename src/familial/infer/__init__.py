"""Inference: KV cache, sampling, the family engine, adaptive exit, speculative decoding."""

from familial.infer.engine import Engine
from familial.infer.requests import (
    GenerationResult,
    QueueFull,
    RequestHandle,
    TokenEvent,
)
from familial.infer.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "QueueFull", "RequestHandle", "SamplingParams", "TokenEvent"]
