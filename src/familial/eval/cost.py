"""What a member costs: parameters, FLOPs per token, and measured prefill/decode latency.

FLOPs per token of one forward step at context length C (the token attends to C keys):

    flops_per_token = 2 * matmul_parameters + 4 * layers * C * num_attention_heads * head_dim

`matmul_parameters` are the weights of every linear layer the member runs, the LM head
included (it is a real (hidden x vocab) matmul per token, and in small models a large share
of the compute); the token embedding is a lookup and does not count. The attention term is
Q K^T plus attention-weighted V, each 2 * C * head_dim per head per layer. Norms, rotary and
softmax are left out, as in Kaplan et al. (2020). Latency is wall-clock on this machine:
the median over `runs` of a batch-1 prefill of `prompt_tokens` random tokens, and of greedy
decoding `decode_tokens` more through a KV cache (reported per token).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from familial.config import FamilyConfig
from familial.model import FamilyModel, KVCache
from familial.summary import summarize


def matmul_parameters(config: FamilyConfig) -> dict[int, int]:
    """{exit: weights of the linear layers the member multiplies by per token}."""
    with torch.device("meta"):
        family = FamilyModel(FamilyConfig.from_dict(config.to_dict()))
    return {e: sum(m.weight.numel() for m in family.member(e).modules() if isinstance(m, nn.Linear))
            for e in config.exits}


def member_costs(config: FamilyConfig, context: int) -> list[dict]:
    """Static cost of every member: parameters (see familial.summary) and FLOPs per token."""
    if context < 1:
        raise ValueError(f"FLOPs context length {context}: expected a positive integer")
    summary = summarize(config)
    matmul = matmul_parameters(config)
    attention = 4 * context * config.num_attention_heads * config.head_dim
    return [{
        "exit": m.exit, "name": m.name, "layers": m.layers, "parameters": m.parameters,
        "non_embedding_parameters": m.non_embedding_parameters,
        "matmul_parameters": matmul[m.exit],
        "flops_per_token": 2 * matmul[m.exit] + attention * m.layers, "flops_context": context,
    } for m in summary.members]


@torch.inference_mode()
def measure_latency(model: FamilyModel, exit_layer: int, prompt_tokens: int = 128,
                    decode_tokens: int = 32, runs: int = 5, seed: int = 0) -> dict[str, float]:
    """Median prefill time (ms) and greedy decode time per token (ms) of one member, batch 1."""
    if prompt_tokens + decode_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt {prompt_tokens} + decode {decode_tokens} tokens exceed the "
                         f"family's max_position_embeddings {model.config.max_position_embeddings}")
    if min(prompt_tokens, decode_tokens, runs) < 1:
        raise ValueError("prompt_tokens, decode_tokens and runs must be positive")
    member = model.member(exit_layer)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(model.config.vocab_size, (1, prompt_tokens), generator=generator).to(device)
    prefill, decode = [], []
    # The first run warms allocator and kernels up and is not counted.
    for run in range(runs + 1):
        cache = KVCache()
        start = time.perf_counter()
        token = member(prompt, cache=cache)[:, -1:].argmax(-1)
        _sync(device)
        middle = time.perf_counter()
        for i in range(decode_tokens):
            position = torch.tensor([[prompt_tokens + i]], device=device)
            token = member(token, position_ids=position, cache=cache)[:, -1:].argmax(-1)
        _sync(device)
        end = time.perf_counter()
        if run:
            prefill.append(middle - start)
            decode.append((end - middle) / decode_tokens)
    return {"prefill_ms": 1e3 * statistics.median(prefill),
            "decode_ms_per_token": 1e3 * statistics.median(decode)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
