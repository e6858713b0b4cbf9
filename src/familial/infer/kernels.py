"""The serving runner's decoder layers and heads on the fastest kernels torch has for the device.

On CPU, `F.linear` hands the weight as stored to MKL's GEMM, which re-blocks it on every call.
oneDNN (in every x86 and ARM build of torch) runs the same product from a weight reordered
once into its own blocked layout, and fuses the element-wise step that follows it into the
GEMM's output (what that is worth per shape: `bench/packed_layers.py`, figures in the README).
So a `packed` layer runs:
- q, k and v as one product (the normed input read once);
- o and down with the residual add fused into the product;
- gate and up as one product (oneDNN's fused SiLU and multiply on two products instead ran
  no faster, and one call fewer counts at a decoding step of a small model);
and each exit's head from a packed copy too. In float32, the steps between the products run on
familial.infer.native's kernels where they built: RMSNorm and SiLU x up in one pass each, and
attention in one call per layer for every row of the call (decoding rows and prompt chunks, each
in a slot of its own), which also norms, rotates and caches the keys; a call where two rows
share a slot (a speculative catch-up beside its decoding row) attends with the cache's own code
(torch's SDPA).

oneDNN picks the blocked layout by the number of rows it expects, and the layout for one row
(a matrix-vector product) is not the one for many: one row runs 1.1-1.4x faster on weights
packed for one row than for 32 (and than MKL's GEMV on the weights as stored, which also
leaves a second thread idle), 16 rows 1.6x slower. So every weight is packed twice, for one
row and for 32 (vLLM's CPU backend packs for 32), and a call takes the pack of its row count:
the runner holds the weights three times (the model's and two packs). Results match the
model's to float rounding (1e-5 relative in float32).

Packed copies would go stale when the weights change under a running runner (a GRPO update
between rollouts, `load_state_dict`, `model.to`): each pack remembers its source tensors by
weak reference with their storage and version counter (which every in-place write bumps),
and is rebuilt before it is used once any of them changed, so a stale pack never runs.
`refresh()` repacks everything at once (right after an update, so the next call does not pay
for it); `packs` counts how many were built.

`eager` runs the model's own modules (the reference; any device, dtype or LowRankLinear
projection the packed path does not cover falls back to it layer by layer).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from familial.infer import native
from familial.model import DecoderLayer, FamilyModel

# "auto": packed where the device and dtype allow, else eager.
MODES = ("auto", "packed", "eager")


def packable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN runs packed products of this dtype on this device."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# The row counts packs are laid out for: one row, and every call of more (vLLM packs for 32).
ONE_ROW, MANY_ROWS = 1, 32


def _layout(rows: int) -> int:
    """The layout a call of `rows` rows runs on."""
    return ONE_ROW if rows == 1 else MANY_ROWS


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fused: str = "none") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, fused, [], "")


def _linear_with(x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 op: str) -> torch.Tensor:
    """x @ weight.T (+ bias), then `op` ("add", "mul") with `other`, in one call."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, op)


@dataclass
class _Entry:
    sources: list[tuple[weakref.ref, int, int]]
    value: object


class Packs:
    """Values built from tensors, rebuilt when any source tensor changed (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[object, _Entry] = {}
        self.packs = 0

    def get(self, key: object, sources: list[torch.Tensor], build: Callable[[], object]) -> object:
        entry = self._entries.get(key)
        if entry is None or not self._current(entry, sources):
            entry = _Entry([(weakref.ref(t), t.data_ptr(), t._version) for t in sources], build())
            self._entries[key] = entry
            self.packs += 1
        return entry.value

    @staticmethod
    def _current(entry: _Entry, sources: list[torch.Tensor]) -> bool:
        if len(sources) != len(entry.sources):
            return False
        return all(ref() is t and t.data_ptr() == ptr and t._version == version
                   for (ref, ptr, version), t in zip(entry.sources, sources))

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class _LayerPack:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    # query heads, then key heads (the value heads follow).
    heads: tuple[int, int]
    # Qwen3's q_norm and k_norm weights, one row per query head then per key head (None: Llama),
    # and their epsilon.
    qk_norm: torch.Tensor | None
    qk_eps: float
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _layer_sources(layer: DecoderLayer) -> list[torch.Tensor] | None:
    """The tensors a layer's pack is built from; None when a projection is not a plain Linear.
    Read through the modules' own dicts: it runs before every packed call, and nn.Module's
    attribute lookup made it a visible share of a small model's decoding step."""
    attn, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
    linears = [attn[name] for name in _ATTENTION] + [mlp[name] for name in _MLP]
    # The fused MLP products take no bias (Llama's rare mlp_bias runs on the module path).
    if any(type(m) is not nn.Linear for m in linears) or linears[4]._parameters["bias"] is not None:
        return None
    sources = [t for m in linears for t in (m._parameters["weight"], m._parameters["bias"]) if t is not None]
    if attn.get("q_norm") is None:
        return sources
    q_norm, k_norm = attn["q_norm"], attn["k_norm"]
    if q_norm.eps != k_norm.eps:
        return None
    return sources + [q_norm._parameters["weight"], k_norm._parameters["weight"]]


def _build_layer(layer: DecoderLayer, rows: int) -> _LayerPack:
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    biases = None
    if attn.q_proj.bias is not None:
        biases = torch.cat([p.bias.detach() for p in projections])
    dim = attn.head_dim
    heads = (attn.q_proj.out_features // dim, attn.k_proj.out_features // dim)
    qk_norm, qk_eps = None, 0.0
    if attn.q_norm is not None:
        qk_norm = torch.cat([attn.q_norm.weight.detach().expand(heads[0], dim),
                             attn.k_norm.weight.detach().expand(heads[1], dim)])
        qk_eps = attn.q_norm.eps
    return _LayerPack(_pack(torch.cat([p.weight.detach() for p in projections]), rows), biases, heads, qk_norm, qk_eps,
                      _pack(attn.o_proj.weight, rows), None if attn.o_proj.bias is None else attn.o_proj.bias.detach(),
                      _pack(torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()]), rows),
                      _pack(mlp.down_proj.weight, rows))


class Kernels:
    """How the runner runs a decoder layer and an exit's norm and head."""

    def __init__(self, model: FamilyModel, mode: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"kernels = {mode!r}: expected one of {', '.join(MODES)}")
        parameter = next(model.parameters())
        available = packable(parameter.device, parameter.dtype)
        if mode == "packed" and not available:
            raise ValueError(f"kernels = 'packed' needs a CPU with oneDNN and float32 weights (or bfloat16 "
                             f"where the CPU has bf16 instructions), not {parameter.dtype} on {parameter.device}")
        self.model = model
        self.mode = "packed" if mode == "auto" and available else mode if mode != "auto" else "eager"
        self._packs = Packs()
        # Float32 runs familial.infer.native's kernels between the products, where they built.
        self.native_seconds = native.load() if self.mode == "packed" and parameter.dtype == torch.float32 else None
        self.native = self.native_seconds is not None
        self._sin: torch.Tensor | None = None
        self._signed_sin: torch.Tensor | None = None

    def describe(self) -> str:
        """What runs the layers, for a server's start-up line."""
        if self.mode == "eager":
            return "the model's own modules (kernels = eager)"
        if self.native:
            return f"packed oneDNN products and native kernels (ready in {self.native_seconds:.1f} s)"
        return "packed oneDNN products and torch's attention"

    @property
    def packs(self) -> int:
        """Packs built so far (each layer and head once, and again after its weights changed)."""
        return self._packs.packs

    def refresh(self) -> None:
        """Repack every layer and head now from the current weights."""
        self._packs.clear()
        if self.mode != "packed":
            return
        layers = [*self.model.model.layers.values()]
        for exit_layer in self.model.config.exits[:-1]:
            layers += self.model.branch_layers(exit_layer)
        for rows in (ONE_ROW, MANY_ROWS):
            for layer in layers:
                self._layer_pack(layer, rows)
            for exit_layer in self.model.config.exits:
                self._head_pack(self.model.exit_head(exit_layer), rows)

    def _layer_pack(self, layer: DecoderLayer, rows: int) -> _LayerPack | None:
        sources = _layer_sources(layer)
        if sources is None:
            return None
        layout = _layout(rows)
        return self._packs.get((id(layer), layout), sources, lambda: _build_layer(layer, layout))

    def _head_pack(self, head: nn.Module, rows: int) -> torch.Tensor | None:
        if type(head) is not nn.Linear or head.bias is not None:
            return None
        layout = _layout(rows)
        return self._packs.get((id(head), layout), [head.weight], lambda: _pack(head.weight, layout))

    def layer(self, layer: DecoderLayer, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
              cache) -> torch.Tensor:
        """`layer(x, rotary, None, cache)`, on packed kernels where it has them."""
        pack = self._layer_pack(layer, x.shape[1]) if self.mode == "packed" else None
        if pack is None:
            return layer(x, rotary, None, cache)
        batch, length, _ = x.shape
        heads = _linear(self._norm(layer.input_layernorm, x), pack.qkv, pack.qkv_bias)
        out = self._attend(layer, pack, heads, rotary, cache)
        x = _linear_with(out, x, pack.o, pack.o_bias, "add")
        gate_up = _linear(self._norm(layer.post_attention_layernorm, x), pack.gate_up, None)
        if self.native:
            inner = native.silu_mul(gate_up.view(batch * length, -1)).view(batch, length, -1)
        else:
            gate, up = gate_up.chunk(2, -1)
            inner = F.silu(gate).mul_(up)
        return _linear_with(inner, x, pack.down, None, "add")

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return native.rms_norm(x, norm._parameters["weight"], norm.eps)
        return norm(x)

    def _attend(self, layer: DecoderLayer, pack: _LayerPack, heads: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor], cache) -> torch.Tensor:
        """Attention of (B, T, q/k/v features) projected heads -> (B, T, heads * D): one native
        call for the whole call where each row has a slot of its own, torch's kernels otherwise."""
        rows = cache.row_tensors if self.native and heads.shape[0] == 1 else None
        if rows is None:
            return self._attention(layer, pack, heads, rotary, cache)
        keys, values = cache.cache.buffers(layer.cache_name)
        return native.attention(heads[0], pack.qk_norm, pack.qk_eps, *rotary, keys, values, *rows, pack.heads[0])[None]

    def _attention(self, layer: DecoderLayer, pack: _LayerPack, heads: torch.Tensor,
                   rotary: tuple[torch.Tensor, torch.Tensor], cache) -> torch.Tensor:
        """`_attend` on torch's kernels (and the native in-place norm and rotary where built)."""
        dim = layer.self_attn.head_dim
        heads = heads.view(*heads.shape[:2], -1, dim)
        batch, length = heads.shape[:2]
        # Queries and keys side by side (B, T, heads, D): their norms and rotary in one pass each.
        q_heads, k_heads = pack.heads
        qk = heads[:, :, :q_heads + k_heads]
        if self.native and batch == 1:
            native.norm_rotate_(heads[0], pack.qk_norm, pack.qk_eps, *rotary, q_heads + k_heads)
        else:
            if pack.qk_norm is not None:
                qk = F.rms_norm(qk, (dim,), None, pack.qk_eps).mul_(pack.qk_norm)
            qk = self._rotate(qk, *rotary)
        # (B, T, heads, D) -> (B, heads, T, D), as Attention.forward.
        q, k = qk.transpose(1, 2).split(pack.heads, 1)
        v = heads[:, :, q_heads + k_heads:].transpose(1, 2)
        return cache.attend(layer.cache_name, q, k, v, None).transpose(1, 2).reshape(batch, length, -1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`apply_rotary` on (B, T, heads, D), bit for bit: rotate_half(x) * sin is x with its
        halves swapped (one copy) times sin with its first half negated, which every layer of a
        call shares (built once per call's `sin`)."""
        if self._sin is not sin:
            half = sin.shape[-1] // 2
            self._sin, self._signed_sin = sin, torch.cat((-sin[..., :half], sin[..., half:]), -1)
        half = x.shape[-1] // 2
        swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
        return (x * cos[:, :, None]).add_(swapped * self._signed_sin[:, :, None])

    def head(self, exit_layer: int, h: torch.Tensor) -> torch.Tensor:
        """Exit `exit_layer`'s norm and head on (N, hidden) states -> (N, vocab) logits."""
        head, h = self.model.exit_head(exit_layer), self._norm(self.model.exit_norm(exit_layer), h)
        pack = self._head_pack(head, h.shape[0]) if self.mode == "packed" else None
        return head(h) if pack is None else _linear(h, pack, None)
