"""Tiny random dense Qwen3 and Llama checkpoints written with stock transformers, for
import/export tests.

A plain module (not conftest) so that test files anywhere can import it by a unique name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_hf_config(**overrides) -> dict:
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 97,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
    }
    config.update(overrides)
    return config


def write_tiny_hf(directory: Path, seed: int = 0, dtype: torch.dtype | None = None, **overrides) -> Path:
    """A random dense Qwen3 checkpoint saved by stock transformers (in `dtype` if given)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    hf_config = Qwen3Config(**{k: v for k, v in tiny_hf_config(**overrides).items()
                               if k not in ("architectures", "model_type")})
    model = Qwen3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        # Norm weights start at one; perturb them so a wrong norm mapping cannot hide.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return directory


def tiny_llama_config(**overrides) -> dict:
    """A tiny Llama shaped like SmolLM2 (no head_dim field, GQA, rope base 100000)."""
    config = {
        "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
    }
    config.update(overrides)
    return config


def write_tiny_llama(directory: Path, seed: int = 0, **overrides) -> Path:
    """A random dense Llama checkpoint saved by stock transformers, biases and norms perturbed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**tiny_llama_config(**overrides))).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return directory
