"""Import a llama.cpp GGUF file (architecture `llama` or `qwen3`) as a family checkpoint.

Every tensor is dequantised to float32 with the `gguf` package (whatever types it can read:
F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants and more), llama's Q/K rows are put back
in Hugging Face order (llama.cpp's converter interleaves them for its rotary layout), and the
tokenizer and chat template in the metadata become `tokenizer.json` and
`tokenizer_config.json`. Exits and branches are then initialised as for a dense HF import.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from familial.config import ConfigError, FamilyConfig
from familial.gguf.tokenizer import tokenizer_from_metadata
from familial.staging import atomic_directory

ARCHITECTURES = ("llama", "qwen3")
# Hugging Face tensor name (inside one layer, or whole-model) -> GGUF tensor name.
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
MODEL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a dense HF Qwen3/Llama tensor name."""
    if hf_name in MODEL_TENSORS:
        return MODEL_TENSORS[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    for key, name in LAYER_TENSORS.items():
        if rest == key:
            return f"blk.{layer}.{name}"
        if rest.startswith(key + "."):
            return f"blk.{layer}.{name}{rest[len(key):]}"
    raise KeyError(hf_name)


def permute_rotary(rows: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's Q/K row order for llama (each head's two rotary halves interleaved), or
    with `inverse` back to Hugging Face's (halves one after the other)."""
    shape = rows.shape
    half = shape[0] // heads // 2
    if inverse:
        return rows.reshape(heads, half, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    return rows.reshape(heads, 2, half, *shape[1:]).transpose(1, 2).reshape(shape)


class GGUFFile:
    """A GGUF file's metadata (as plain Python values) and lazily dequantised tensors."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, OSError, IndexError) as error:
            raise ConfigError(f"{self.path}: not a readable GGUF file (truncated or corrupt? {error})") from None
        self.meta: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.meta[key] = _value(field)
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.architecture = self.meta.get("general.architecture")

    def arch(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.architecture}.{key}", default)

    def shape(self, name: str) -> list[int]:
        # GGUF lists dimensions fastest-first; torch's order is the reverse.
        return [int(n) for n in reversed(self.tensors[name].shape.tolist())]

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` as float32 in torch's dimension order."""
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ConfigError(f"{self.path}: tensor '{name}' is of type {tensor.tensor_type.name}, "
                              f"which the gguf package cannot dequantise") from None
        # A copy: F32 data is a read-only view of the memory-mapped file.
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(self.shape(name)))


def _value(field) -> Any:
    from gguf import GGUFValueType

    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.FLOAT32:
        # Stored as float32: keep the shortest decimal that float32 reads back (1e-05, not
        # 9.999999747378752e-06), so an export writes the same bits.
        return float(str(np.float32(value)))
    return value


def gguf_config_fields(source: GGUFFile) -> dict[str, Any]:
    """The decoder fields of a FamilyConfig, from a GGUF file's metadata and tensor list."""
    where = str(source.path)
    arch = source.architecture
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{where}: field 'general.architecture' = {arch!r}: expected one of "
                          f"{', '.join(ARCHITECTURES)}")
    required = {"embedding_length": "hidden_size", "block_count": "num_hidden_layers",
                "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads"}
    fields: dict[str, Any] = {}
    for key, name in required.items():
        value = source.arch(key)
        if not isinstance(value, int):
            raise ConfigError(f"{where}: field '{arch}.{key}' is missing or not an integer")
        fields[name] = value
    heads = fields["num_attention_heads"]
    head_dim = source.arch("attention.key_length") or fields["hidden_size"] // heads
    rotary = source.arch("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ConfigError(f"{where}: field '{arch}.rope.dimension_count' = {rotary}: partial rotary "
                          f"embeddings (head dimension {head_dim}) are not supported")
    scaling_type = source.arch("rope.scaling.type", "none")
    scaling = None
    if "rope_freqs.weight" in source.tensors:
        scaling = llama3_scaling(source, head_dim)
    elif scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(source.arch("rope.scaling.factor"))}
    elif scaling_type not in ("none", None):
        raise ConfigError(f"{where}: field '{arch}.rope.scaling.type' = {scaling_type!r}: only "
                          f"'none' and 'linear' are supported")
    tokens = source.meta.get("tokenizer.ggml.tokens")
    vocab = source.arch("vocab_size") or source.shape("token_embd.weight")[0]
    bias = "blk.0.attn_q.bias" in source.tensors
    fields.update(
        num_key_value_heads=source.arch("attention.head_count_kv", heads),
        head_dim=head_dim,
        vocab_size=vocab,
        rope_theta=float(source.arch("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(source.arch("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=source.arch("context_length", 4096),
        tie_word_embeddings="output.weight" not in source.tensors,
        attention_bias=bias,
        mlp_bias=arch == "llama" and "blk.0.ffn_up.bias" in source.tensors,
        qk_norm=arch == "qwen3",
        bos_token_id=source.meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=source.meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=source.meta.get("tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
    )
    if tokens is not None and len(tokens) != vocab:
        raise ConfigError(f"{where}: {len(tokens)} tokens in 'tokenizer.ggml.tokens' but a vocabulary "
                          f"of {vocab}")
    return fields


def llama3_scaling(source: GGUFFile, head_dim: int) -> dict[str, Any]:
    """Llama 3.1's rope scaling from the per-frequency factors llama.cpp stores instead
    (`rope_freqs.weight`: each rotary frequency is divided by its factor).

    The factors are 1 for short wavelengths, `factor` for long ones, and between them follow
    the smooth ramp of (original context / wavelength); only the ratios of the original
    context to the two band edges show in them, so the original context is taken from the
    metadata (else Llama 3.1's 8192) and the band edges fitted to the ramp. The scaling is
    accepted only if it gives back every stored factor.
    """
    from familial.model import llama3_inverse_frequencies

    where = f"{source.path}: tensor 'rope_freqs.weight'"
    factors = source.get("rope_freqs.weight").double()
    base = float(source.arch("rope.freq_base", 10000.0))
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if factors.shape != plain.shape:
        raise ConfigError(f"{where} has {factors.numel()} factors, expected {plain.numel()} (head_dim / 2)")
    factor = float(factors.max())
    original = int(source.arch("rope.scaling.original_context_length") or 8192)
    candidates = [{"low_freq_factor": 1.0, "high_freq_factor": 4.0}]  # Llama 3.1, 3.2, 3.3
    ramp = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if int(ramp.sum()) >= 2 and factor > 1:
        # smooth = (1/f - 1/factor) / (1 - 1/factor) = original/wavelength/(high-low) - low/(high-low)
        smooth = (1 / factors[ramp] - 1 / factor) / (1 - 1 / factor)
        x = original / (2 * math.pi / plain.double()[ramp])
        slope = float(((x - x.mean()) * (smooth - smooth.mean())).sum() / ((x - x.mean()) ** 2).sum())
        low = float(-(smooth.mean() - slope * x.mean()) / slope)
        candidates.append({"low_freq_factor": low, "high_freq_factor": low + 1 / slope})
    for candidate in candidates:
        scaling = {"rope_type": "llama3", "factor": factor, "original_max_position_embeddings": original,
                   **candidate}
        if not 0 < candidate["low_freq_factor"] < candidate["high_freq_factor"]:
            continue
        scaled = llama3_inverse_frequencies(plain, scaling, original)
        if torch.allclose(plain / scaled, factors.float(), rtol=1e-4, atol=0):
            return scaling
    raise ConfigError(f"{where}: its factors follow no llama3 rope scaling (factor {factor:g}); "
                      f"other per-frequency scalings are not supported")


def gguf_sources(source: GGUFFile, config: FamilyConfig
                 ) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, int]]:
    """{family tensor name: producer of its float32 value} and each one's size in bytes, every
    source tensor checked."""
    from familial.checkpoint_io import CheckpointError, _dense_sources, family_parameter_names

    dense = _dense_sources(config)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    plan, sizes = {}, {}
    for name, shape in family_parameter_names(config).items():
        key = gguf_name(dense(name))
        if key not in source.tensors:
            raise CheckpointError(f"{source.path}: tensor '{key}' (needed for '{name}') is missing")
        found = source.shape(key)
        if found != shape:
            raise CheckpointError(f"{source.path}: tensor '{key}' has shape {found}, expected {shape} "
                                  f"from its metadata")
        kind = key.split(".")[2] if key.startswith("blk.") else ""
        if source.architecture == "llama" and kind in heads:
            plan[name] = lambda key=key, n=heads[kind]: permute_rotary(source.get(key), n, inverse=True)
        else:
            plan[name] = lambda key=key: source.get(key)
        sizes[name] = 4 * int(np.prod(shape))
    return plan, sizes


def import_gguf(path: str | Path, output: str | Path, exits: list[int] | None, branch_layers: int = 1,
                shared_head: bool = False, member_names: dict[str, int] | None = None,
                overwrite: bool = False, max_shard_bytes: int | None = None) -> FamilyConfig:
    """Write a family checkpoint (float32) from a GGUF file, with `exits` added."""
    from familial.checkpoint_io import DEFAULT_SHARD_BYTES, check_branches_fit, write_tensors

    source = GGUFFile(path)
    fields = gguf_config_fields(source)
    if not exits:
        raise ConfigError(f"import of {Path(path).name} needs exits (for example --exits 1,3,5)")
    fields.update(exits=list(exits), branch_layers=branch_layers, shared_head=shared_head,
                  member_names=dict(member_names or {}))
    config = FamilyConfig.from_dict(fields, where=f"{path} with the requested exits")
    check_branches_fit(config)
    plan, sizes = gguf_sources(source, config)
    tokenizer = None
    if "tokenizer.ggml.tokens" in source.meta:
        tokenizer = tokenizer_from_metadata(
            {**source.meta, "context_length": config.max_position_embeddings}, str(path))
    with atomic_directory(output, overwrite) as staging:
        checksums = write_tensors(plan, sizes, staging, max_shard_bytes or DEFAULT_SHARD_BYTES)
        config.save(staging, checksums)
        if tokenizer is not None:
            (staging / "tokenizer.json").write_text(tokenizer[0])
            (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer[1], indent=2) + "\n")
    return config

