"""Tiny GGUF files written by the tests themselves with the `gguf` package's own writer.

Each file holds a stock transformers Llama or Qwen3 model's weights as llama.cpp's converter
lays them out (llama's Q/K rows permuted for its rotary layout), every tensor in the type the
test names (quantised with `gguf.quants.quantize`; K-quant tensors, which the package can read
but not write, get random blocks with small scales), and a byte-level BPE tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from hf_checkpoints import tiny_hf_config, tiny_llama_config

TEXT = ("The quick brown fox jumps over the lazy dog. 1234567 apples, 89 pears!\n"
        "    def f(x):\n        return x ** 2  # squares\n"
        "Ça coûte 12,50 € — naïve café. Straße 東京 🙂 don't we'll they're\n") * 8


def train_tokenizer(vocab_size: int):
    from familial.data.tokenizer_train import train_bpe

    return train_bpe([TEXT], vocab_size=vocab_size, min_frequency=1)


def hf_model(arch: str, seed: int = 0, **overrides):
    """A random stock model: hidden 256 so that K-quant blocks (256 values) fit its rows."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    sizes = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaForCausalLM, LlamaConfig(**{**tiny_llama_config(), **sizes, **overrides})
    else:
        fields = {k: v for k, v in tiny_hf_config().items() if k not in ("architectures", "model_type")}
        # head_dim 128 as every Qwen3 has: transformers' GGUF loader assumes it for qwen3.
        config = Qwen3ForCausalLM, Qwen3Config(**{**fields, **sizes, "head_dim": 128, **overrides})
    model = config[0](config[1]).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute.
    return (rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


GGUF_NAMES = {"embed_tokens": "token_embd", "input_layernorm": "attn_norm", "q_proj": "attn_q",
              "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "q_norm": "attn_q_norm",
              "k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "gate_proj": "ffn_gate",
              "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[1] == "layers":
        return f"blk.{parts[2]}.{GGUF_NAMES[parts[-2]]}.{parts[-1]}"
    return f"{GGUF_NAMES[parts[-2]]}.{parts[-1]}"


def random_k_blocks(qtype, rows: int, columns: int, seed: int) -> np.ndarray:
    """Random K-quant blocks whose float16 scales are small, so values stay near 0.02."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(seed).integers(0, 256, (rows, columns // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype == GGMLQuantizationType.Q6_K:
        data[..., 208:210] = scale  # d at the end of the block
    else:
        data[..., 0:2] = scale  # d, then dmin
        data[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), dtype=np.uint8)
    return data.reshape(rows, -1)


def llama3_factors(config) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors (rope_freqs for llama3 scaling).
    rope = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(path: Path, model, arch: str, types: dict[str, str], tokenizer=None, pre: str = "qwen2",
               chat_template: str | None = None) -> Path:
    """Write `model` as a GGUF file; `types` maps a GGUF tensor-kind suffix (e.g. 'attn_q') to a
    GGML type name, others are F32. Returns the path."""
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import quantize

    config = model.config
    head_dim = config.head_dim
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        tokens = [None] * config.vocab_size
        for token, i in vocab.items():
            tokens[i] = token
        tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        kinds = [TokenType.CONTROL if t in special else TokenType.NORMAL if not t.startswith("[PAD")
                 else TokenType.UNUSED for t in tokens]
        import json
        merges = json.loads(tokenizer.to_str())["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(kinds)
        writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
        writer.add_bos_token_id(vocab["<|im_start|>"])
        writer.add_eos_token_id(vocab["<|im_end|>"])
        writer.add_add_bos_token(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
    for i, (name, param) in enumerate(model.state_dict().items()):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        key = gguf_tensor_name(name)
        values = param.float().numpy()
        kind = key.split(".")[-2]
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            values = llama_cpp_permute(values, config.num_attention_heads if kind == "attn_q"
                                       else config.num_key_value_heads)
        qtype = GGMLQuantizationType[types.get(kind, "F32") if values.ndim == 2 else "F32"]
        if qtype in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K):
            writer.add_tensor(key, random_k_blocks(qtype, *values.shape, seed=i), raw_dtype=qtype)
        elif qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(key, quantize(values, qtype))
        else:
            writer.add_tensor(key, quantize(values, qtype), raw_dtype=qtype)
    if config.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_factors(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
