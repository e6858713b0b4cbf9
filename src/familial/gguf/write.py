"""Export members as GGUF files that stock llama.cpp loads (architecture `llama` or `qwen3`).

A member is written as llama.cpp's own converter (convert_hf_to_gguf.py) writes the dense model
it equals: the same metadata keys, tensor names and, for llama, Q/K rows permuted into its
rotary layout; Llama 3.1's rope scaling becomes the `rope_freqs` factors. Matrices are stored
in the requested type (f32, f16, bf16 or q8_0; a q8_0 matrix whose rows do not split into
32-value blocks falls back to f16, as llama.cpp's converter does); norms and biases stay f32.
The family's tokenizer.json and chat template go into the metadata. Tensors are converted
and written one at a time, and the file appears complete in one rename, or not at all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from familial.config import ConfigError, FamilyConfig
from familial.gguf.read import gguf_name, permute_rotary
from familial.gguf.tokenizer import metadata_from_tokenizer
from familial.staging import atomic_directory, atomic_file

TYPES = ("f32", "f16", "bf16", "q8_0")


def llama3_rope_factors(config: FamilyConfig) -> torch.Tensor:
    """`rope_freqs.weight`: llama.cpp divides each rotary frequency by its factor."""
    scaling = config.rope_scaling
    dim, base = config.head_dim, config.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def member_shapes(config: FamilyConfig, exit_layer: int) -> dict[str, list[int]]:
    """Shape of each tensor of the member as a dense model (low-rank matrices merged)."""
    from familial.model import FamilyModel

    with torch.device("meta"):
        family = FamilyModel(FamilyConfig.from_dict({**config.to_dict(), "low_rank": {}}))
    return {name: list(t.shape) for name, t in family.member(exit_layer).state_dict().items()}


def tokenizer_metadata(family_dir: Path, config: FamilyConfig) -> dict[str, Any]:
    """The GGUF `tokenizer.*` fields from the family's tokenizer files (llama.cpp needs them)."""
    path = family_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{family_dir}: no tokenizer.json; a GGUF file carries its tokenizer and "
                          f"llama.cpp loads none without it")
    document = json.loads(path.read_text())
    config_path = family_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if (family_dir / "chat_template.jinja").is_file():
        tokenizer_config["chat_template"] = (family_dir / "chat_template.jinja").read_text()
    fields = metadata_from_tokenizer(document, tokenizer_config, config.vocab_size, str(path))
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    for key, value in (("bos", config.bos_token_id), ("eos", eos), ("padding", config.pad_token_id)):
        if value is not None:
            fields.setdefault(f"tokenizer.ggml.{key}_token_id", value)
    return fields


def _architecture_metadata(config: FamilyConfig, exit_layer: int) -> dict[str, Any]:
    arch = config.architecture
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3") or (kind == "llama3" and arch != "llama"):
        raise ConfigError(f"family config: field 'rope_scaling' = {config.rope_scaling!r}: GGUF export "
                          f"supports plain, linear and (for Llama) llama3 rope scaling")
    fields = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.member_layers(exit_layer),
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim,
        "attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "rope.freq_base": config.rope_theta,
        "rope.dimension_count": config.head_dim,
        "vocab_size": config.vocab_size,
    }
    if kind == "linear":
        fields.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(scaling["factor"])})
    if kind == "llama3" and scaling.get("original_max_position_embeddings"):
        # llama.cpp reads only the rope_freqs factors; this lets an import give back the same scaling.
        fields["rope.scaling.original_context_length"] = scaling["original_max_position_embeddings"]
    return {f"{arch}.{key}": value for key, value in fields.items()}


def _encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    from gguf.quants import quantize

    return quantize(tensor.detach().to(torch.float32).numpy(), qtype)


def _tensor_type(shape: list[int], wanted: str):
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2:
        return Q.F32
    if wanted == "q8_0" and shape[-1] % 32:
        return Q.F16
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[wanted]


def _write_member(config: FamilyConfig, exit_layer: int, reader, path: Path, wanted: str,
                  tokenizer: dict[str, Any]) -> None:
    import gguf

    from familial.checkpoint_io import _plan_member

    plan, _, _ = _plan_member(config, exit_layer, reader)
    arch = config.architecture
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tensors = {}
    for hf_name, produce in plan.items():
        name = gguf_name(hf_name)
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if arch == "llama" and kind in heads:
            tensors[name] = lambda produce=produce, n=heads[kind]: permute_rotary(produce().float(), n)
        else:
            tensors[name] = produce
    dense = member_shapes(config, exit_layer)
    shapes = {name: dense[hf_name] for name, hf_name in zip(tensors, plan)}
    if (config.rope_scaling or {}).get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = lambda: llama3_rope_factors(config)
        shapes["rope_freqs.weight"] = [config.head_dim // 2]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(config.member_name(exit_layer))
    writer.add_type("model")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[wanted])
    for key, value in {**_architecture_metadata(config, exit_layer), **tokenizer}.items():
        _add(writer, key, value)
    types = {name: _tensor_type(shape, wanted) for name, shape in shapes.items()}
    for name, shape in shapes.items():
        qtype = types[name]
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, produce in tensors.items():
            writer.write_tensor_data(_encode(produce(), types[name]))
    finally:
        writer.close()


def _add(writer, key: str, value: Any) -> None:
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list) and key == "tokenizer.ggml.token_type":
        writer.add_array(key, [gguf.TokenType(v) for v in value])
    else:
        writer.add_array(key, value)


def export_member_gguf(family_dir: str | Path, output: str | Path, member: int | str, type: str = "f32",
                       overwrite: bool = False) -> Path:
    """Write member `member` as one GGUF file `output` that llama.cpp loads."""
    from familial.checkpoint_io import SafetensorsReader, check_family_tensors

    family_dir = Path(family_dir)
    config = FamilyConfig.load(family_dir)
    exit_layer = config.resolve_member(member)
    _check_type(type)
    tokenizer = tokenizer_metadata(family_dir, config)
    _architecture_metadata(config, exit_layer)  # refuse what cannot be written before writing
    with SafetensorsReader(family_dir) as reader:
        check_family_tensors(family_dir, config, reader)
        with atomic_file(output, overwrite) as staging:
            _write_member(config, exit_layer, reader, staging, type, tokenizer)
    return Path(output)


def export_all_gguf(family_dir: str | Path, output: str | Path, type: str = "f32",
                    overwrite: bool = False) -> list[Path]:
    """Every member as output/<member name>.gguf, all or nothing."""
    from familial.checkpoint_io import SafetensorsReader, check_family_tensors

    family_dir = Path(family_dir)
    config = FamilyConfig.load(family_dir)
    _check_type(type)
    tokenizer = tokenizer_metadata(family_dir, config)
    _architecture_metadata(config, config.exits[-1])
    names = [f"{config.member_name(e)}.gguf" for e in config.exits]
    with SafetensorsReader(family_dir) as reader:
        check_family_tensors(family_dir, config, reader)
        with atomic_directory(output, overwrite) as staging:
            for exit_layer, name in zip(config.exits, names):
                _write_member(config, exit_layer, reader, staging / name, type, tokenizer)
    return [Path(output) / name for name in names]


def _check_type(type: str) -> None:
    if type not in TYPES:
        raise ConfigError(f"GGUF type {type!r}: expected one of {', '.join(TYPES)}")
