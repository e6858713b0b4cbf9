"""The familial model (Qwen3 or Llama): one trunk, several exits, each exit a deployable member.

Reads top to bottom: RMSNorm -> rotary -> attention -> MLP -> decoder layer -> exit branch
-> family -> member view. Parameter names follow transformers' Qwen3 and Llama (`model.layers.3.
self_attn.q_proj.weight`, `lm_head.weight`), so the full member's names are exactly a dense
checkpoint's and a member view's `state_dict()` is a stock checkpoint. Branches live
under `branches.<exit>`. No distributed code here: parallelism is applied from outside.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from familial.config import FamilyConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x over its root mean square (last dimension), times `weight` (None: unscaled; any shape
    that broadcasts, such as several layers' norms stacked)."""
    if x.dtype == torch.float32 and (weight is None or (weight.dtype == torch.float32
                                                        and weight.shape == x.shape[-1:])):
        # Exactly the steps below in one fused kernel: per-op overhead is much of a small
        # model's decode step, and training's float32 path saves the same memory traffic.
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    # Normalise in float32 like Qwen3, then scale in the input dtype.
    dtype = x.dtype
    x = x.float()
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return x if weight is None else weight * x


class LowRankLinear(nn.Module):
    """A linear layer stored as two thin matrices (W ~ up @ down), as SVD compression leaves it."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight


def rotary_inverse_frequencies(config: FamilyConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale for the configured RoPE variant, computed on
    the CPU even while a model is built on the meta device (whose ops load torch's compiler)."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "yarn":
        factor = scaling["factor"]
        original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return inv_freq, attention_factor
    if kind == "llama3":
        return llama3_inverse_frequencies(inv_freq, scaling, config.max_position_embeddings), 1.0
    return inv_freq, 1.0


def llama3_inverse_frequencies(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    """Llama 3.1's scaling, step for step as transformers computes it (float32 wavelengths):
    long wavelengths divided by `factor`, short ones kept, those between interpolated."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling.get("original_max_position_embeddings") or max_positions
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: FamilyConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.scale = rotary_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset(self) -> None:
        """Recompute the table in place (after `to_empty` left it uninitialised)."""
        with torch.no_grad():
            self.inv_freq.copy_(rotary_inverse_frequencies(self.config)[0])

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> cos, sin (B, T, head_dim), computed in float32.
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.scale).to(dtype), (angles.sin() * self.scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, heads, T, D); cos/sin (B, T, D) broadcast over heads.
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def causal_mask(query_length: int, kv_length: int, device: torch.device) -> torch.Tensor:
    """Boolean (T_q, T_kv) mask for queries that are the last T_q of T_kv positions."""
    rows = torch.arange(query_length, device=device)[:, None] + (kv_length - query_length)
    return torch.arange(kv_length, device=device)[None, :] <= rows


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of (B, heads, T, D) queries, the last T of k/v's T_kv positions -> (B, heads, T, D).

    Without a mask it is causal; the fast kernel's own causal flag needs T == T_kv.
    """
    length, kv_length = q.shape[2], k.shape[2]
    is_causal = mask is None and length == kv_length and length > 1
    if mask is None and 1 < length < kv_length:
        # New tokens after a cached prefix (speculative verification): causal with an offset.
        mask = causal_mask(length, kv_length, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


class KVStore(Protocol):
    """Where attention keeps keys/values between calls (the runtime's cache implements it).

    The store does the attention itself, so it can lay out keys as it likes (the runtime's
    slot cache attends each row of a packed batch over its own slot, without copying).
    """

    def attend(self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Keep `layer`'s new (B, kv_heads, T, D) keys/values; return the (B, heads, T, D)
        queries' attention over every key kept so far."""


class KVCache:
    """The simplest KVStore: keys and values concatenated per layer name."""

    def __init__(self) -> None:
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def attend(self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return attend(q, k, v, mask)

    def length(self, layer: str) -> int:
        return self.keys[layer].shape[2] if layer in self.keys else 0


class Attention(nn.Module):
    def __init__(self, config: FamilyConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        # Qwen3 normalises each query/key head before RoPE; Llama has no such weights.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, cache: KVStore | None, cache_name: str) -> torch.Tensor:
        batch, length, _ = x.shape
        # (B, T, heads*D) -> (B, heads, T, D); the local head count follows the weights so a
        # tensor-parallel shard of this module runs unchanged.
        q = self.q_proj(x).view(batch, length, -1, self.head_dim)
        k = self.k_proj(x).view(batch, length, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, mask) if cache is None else cache.attend(cache_name, q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: FamilyConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: FamilyConfig, cache_name: str) -> None:
        super().__init__()
        # The family-wide name keys this layer's KV cache, so members share trunk KV.
        self.cache_name = cache_name
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None, cache: KVStore | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache, self.cache_name)
        return x + self.mlp(self.post_attention_layernorm(x))


class ExitBranch(nn.Module):
    """An early exit's own layers, final norm and (unless shared) LM head."""

    def __init__(self, config: FamilyConfig, exit_layer: int) -> None:
        super().__init__()
        depth = config.branch_depth(exit_layer)
        self.layers = nn.ModuleList(
            DecoderLayer(config, f"branches.{exit_layer}.layers.{i}") for i in range(depth))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.shared_head else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)


class Trunk(nn.Module):
    """The decoder stack shared by every member (named `model` as in transformers)."""

    def __init__(self, config: FamilyConfig) -> None:
        super().__init__()
        # Given storage, nn.Embedding skips its own initialiser (FamilyModel initialises every
        # weight once): on the meta device that initialiser imports torch's compiler, seconds
        # added to every command that only reads a family.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        # Keyed by layer number so names stay stable when a pipeline stage keeps only some.
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(config, f"layers.{i}") for i in range(config.num_hidden_layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


def attention_mask_4d(padding_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """(B, T_kv) 1/0 padding mask -> boolean (B, 1, T_q, T_kv) causal + padding mask.

    A query that may see nothing (a pad position before the first real token) is allowed its
    own position, so attention stays finite; its output is padding and never read.
    """
    kv_length = padding_mask.shape[1]
    causal = causal_mask(query_length, kv_length, padding_mask.device)
    keep = causal[None] & padding_mask.bool()[:, None, :]
    own = torch.zeros_like(causal)
    own[torch.arange(query_length), torch.arange(query_length) + kv_length - query_length] = True
    empty = ~keep.any(-1, keepdim=True)
    return (keep | (empty & own))[:, None]


def embed_inputs(embed_tokens: nn.Embedding, rotary_emb: RotaryEmbedding, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None):
    """Token embeddings (B, T, H), the rotary (cos, sin) and the attention mask every layer uses."""
    batch, length = input_ids.shape
    hidden = embed_tokens(input_ids)
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
    mask = attention_mask
    if mask is not None and mask.dim() == 2:
        mask = attention_mask_4d(mask, length)
    return hidden, rotary_emb(position_ids, hidden.dtype), mask


class FamilyModel(nn.Module):
    """A trunk of L layers with exits e_1 < ... < e_K = L-1 (see SPEC section 1).

    Member k runs trunk layers 0..e_k-1, then its branch (the last member: layer e_K), its
    norm and its head. `forward` runs the trunk once and returns every requested exit.
    """

    def __init__(self, config: FamilyConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Trunk(config)
        self.branches = nn.ModuleDict(
            {str(e): ExitBranch(config, e) for e in config.exits[:-1]})
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for name, rank in config.low_rank.items():
            self._swap_low_rank(name, rank)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "weight", None) is not None and module.weight.is_meta:
            return  # shapes only: nothing to initialise, and meta init loads torch's compiler
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def factorize(self, name: str, rank: int) -> LowRankLinear:
        """Replace linear `name` by a rank-`rank` LowRankLinear (weights set by the caller) and
        record it in the config, so a saved family rebuilds the same shapes."""
        low_rank = self._swap_low_rank(name, rank)
        self.config.low_rank = {**self.config.low_rank, name: rank}
        return low_rank

    def _swap_low_rank(self, name: str, rank: int) -> LowRankLinear:
        parent_name, _, child = name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        old = getattr(parent, child)
        low_rank = LowRankLinear(old.in_features, old.out_features, rank)
        setattr(parent, child, low_rank)
        return low_rank

    # Which modules each exit uses.

    def branch_layers(self, exit_layer: int) -> list[DecoderLayer]:
        if exit_layer == self.config.exits[-1]:
            return [self.model.layers[str(exit_layer)]]
        return list(self.branches[str(exit_layer)].layers)

    def exit_norm(self, exit_layer: int) -> RMSNorm:
        if exit_layer == self.config.exits[-1]:
            return self.model.norm
        return self.branches[str(exit_layer)].norm

    def exit_head(self, exit_layer: int) -> nn.Module:
        if exit_layer == self.config.exits[-1] or self.config.shared_head:
            return self.lm_head
        return self.branches[str(exit_layer)].lm_head

    def member(self, member: int | str) -> FamilyMember:
        return FamilyMember(self, self.config.resolve_member(member))

    # Forward.

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rotary_emb(position_ids, dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, exits: list[int | str] | None = None,
                return_hidden: bool = False, cache: KVStore | None = None) -> dict[int, torch.Tensor]:
        """input_ids (B, T) -> {exit: logits (B, T, vocab)} for every requested exit.

        With `return_hidden`, each value is instead the exit's normed hidden state (B, T, H),
        so a loss can apply the head chunk by chunk. `attention_mask` is a (B, T_kv) padding
        mask or a boolean (B, 1, T, T_kv) mask; with a cache, T_kv covers past and new tokens.
        """
        wanted = sorted({self.config.resolve_member(e) for e in (exits or self.config.exits)})
        hidden, rotary, mask = embed_inputs(self.model.embed_tokens, self.model.rotary_emb, input_ids,
                                            attention_mask, position_ids)
        outputs: dict[int, torch.Tensor] = {}

        def keep(exit_layer: int, branch: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
            outputs[exit_layer] = self._norm_and_head(exit_layer, branch, return_hidden)
            return trunk

        last = self.config.exits[-1]
        # The trunk runs only as deep as the deepest wanted exit needs.
        stop = self.config.num_hidden_layers if last in wanted else wanted[-1]
        hidden = self.walk(hidden, rotary, 0, stop, wanted, keep, mask, cache)
        if last in wanted:
            outputs[last] = self._norm_and_head(last, hidden, return_hidden)
        else:
            keep(stop, self.run_branch(stop, hidden, rotary, mask, cache), hidden)
        return outputs

    def walk(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], start: int, stop: int,
             exits: list[int], at_exit, mask: torch.Tensor | None = None,
             cache: KVStore | None = None) -> torch.Tensor:
        """Trunk layers [start, stop) on `hidden`, the state entering layer `start`.

        Before layer e, for each exit e in `exits` (the last exit excepted: its branch is the
        trunk's own last layer), the exit's branch runs on that same state and
        `at_exit(e, branch_output, trunk_state)` returns the trunk state to continue with: the
        family's forward keeps the branch output; a pipeline stage attaches the exit's loss.
        """
        last = self.config.exits[-1]
        for i in range(start, stop):
            if i in exits and i != last:
                hidden = at_exit(i, self.run_branch(i, hidden, rotary, mask, cache), hidden)
            hidden = self.model.layers[str(i)](hidden, rotary, mask, cache)
        return hidden

    def run_branch(self, exit_layer: int, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                   mask: torch.Tensor | None = None, cache: KVStore | None = None) -> torch.Tensor:
        for layer in self.branch_layers(exit_layer):
            hidden = layer(hidden, rotary, mask, cache)
        return hidden

    def _norm_and_head(self, exit_layer: int, hidden: torch.Tensor, return_hidden: bool) -> torch.Tensor:
        hidden = self.exit_norm(exit_layer)(hidden)
        return hidden if return_hidden else self.exit_head(exit_layer)(hidden)


class FamilyMember(nn.Module):
    """One member as a dense Qwen3 or Llama model made of the family's own modules (no copies).

    Its `state_dict()` has exactly the keys of a stock checkpoint with
    `config.member_layers(exit)` layers, which is what export writes.
    """

    def __init__(self, family: FamilyModel, exit_layer: int) -> None:
        super().__init__()
        self.exit_layer = exit_layer
        self.family_config = family.config
        trunk = family.model
        layers = [trunk.layers[str(i)] for i in range(exit_layer)] + family.branch_layers(exit_layer)
        self.model = nn.Module()
        self.model.embed_tokens = trunk.embed_tokens
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = family.exit_norm(exit_layer)
        self.lm_head = family.exit_head(exit_layer)
        self._rotary = trunk.rotary_emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVStore | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVStore | None = None) -> torch.Tensor:
        hidden, rotary, mask = embed_inputs(self.model.embed_tokens, self._rotary, input_ids,
                                            attention_mask, position_ids)
        for layer in self.model.layers:
            hidden = layer(hidden, rotary, mask, cache)
        return self.model.norm(hidden)
