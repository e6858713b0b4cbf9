"""The native CPU kernels: the same results as the model's torch code, checked inputs, and a
runner that still works when they cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from familial.infer import native
from familial.infer.cache import SlotCache
from familial.infer.kernels import Kernels
from familial.infer.runner import Row, Runner
from familial.model import apply_rotary, rms_norm


@pytest.fixture(scope="module")
def built():
    if native.load() is None:
        pytest.skip("the native kernels did not build here (a C++ compiler is needed)")


def rotary_table(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inverse = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions.float()[:, None] * inverse[None]
    angles = torch.cat((angles, angles), -1)[None]
    return angles.cos(), angles.sin()


def reference_attention(qkv, qk_norm, cos, sin, keys, values, slots, starts, lengths, q_heads):
    """What the model does for each row alone: norm, rotate, write the cache, attend causally
    over its slot's prefix."""
    kv_heads, dim = keys.shape[1], keys.shape[3]
    heads = qkv.view(qkv.shape[0], -1, dim)
    qk = heads[:, :q_heads + kv_heads]
    if qk_norm is not None:
        qk = rms_norm(qk, None, 1e-6) * qk_norm
    qk = apply_rotary(qk.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    outputs, offset = [], 0
    for slot, start, length in zip(slots.tolist(), starts.tolist(), lengths.tolist()):
        tokens = slice(offset, offset + length)
        keys[slot, :, start:start + length] = qk[tokens, q_heads:].transpose(0, 1)
        values[slot, :, start:start + length] = heads[tokens, q_heads + kv_heads:].transpose(0, 1)
        query = qk[tokens, :q_heads].transpose(0, 1)[None]
        mask = torch.ones(length, start + length, dtype=torch.bool).tril(start)
        out = F.scaled_dot_product_attention(query, keys[slot:slot + 1, :, :start + length],
                                             values[slot:slot + 1, :, :start + length], attn_mask=mask,
                                             enable_gqa=True)
        outputs.append(out[0].transpose(0, 1).reshape(length, -1))
        offset += length
    return torch.cat(outputs)


@pytest.mark.reference
@pytest.mark.parametrize("dim,q_heads,kv_heads,normed", [(64, 8, 4, True), (128, 4, 4, False), (16, 6, 2, True)],
                         ids=["d64-gqa-qwen3", "d128-mha-llama", "d16-generic"])
def test_attention_is_each_row_causally_over_its_own_slot(built, dim, q_heads, kv_heads, normed):
    """Decoding rows, prompt chunks from position 0 and chunks after cached positions (longer
    than one block of queries, and not a whole number of key blocks) in one call."""
    torch.manual_seed(0)
    slots, starts = torch.tensor([5, 0, 3, 1, 2, 4]), torch.tensor([40, 0, 17, 0, 9, 130])
    lengths = torch.tensor([1, 1, 1, 70, 37, 5])
    keys, values = torch.randn(6, kv_heads, 140, dim), torch.randn(6, kv_heads, 140, dim)
    qkv = torch.randn(int(lengths.sum()), (q_heads + 2 * kv_heads) * dim)
    qk_norm = torch.rand(q_heads + kv_heads, dim) + 0.5 if normed else None
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.tolist(), lengths.tolist())])
    cos, sin = rotary_table(positions, dim)
    want_keys, want_values = keys.clone(), values.clone()
    want = reference_attention(qkv, qk_norm, cos, sin, want_keys, want_values, slots, starts, lengths, q_heads)
    got = native.attention(qkv, qk_norm, 1e-6, cos, sin, keys, values, slots, starts, lengths, q_heads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, want_keys, atol=1e-5, rtol=1e-5)
    assert torch.equal(values, want_values)


@pytest.mark.reference
def test_element_wise_kernels_match_torch(built):
    torch.manual_seed(0)
    x, weight = torch.randn(3, 5, 96), torch.rand(96) + 0.5
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-6), rms_norm(x, weight, 1e-6), atol=1e-6, rtol=1e-5)
    gate_up = torch.randn(7, 2 * 48) * 6
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(native.silu_mul(gate_up), F.silu(gate) * up, atol=1e-6, rtol=1e-5)
    heads, weight = torch.randn(5, 6, 32), torch.rand(4, 32) + 0.5
    cos, sin = rotary_table(torch.arange(5) * 3, 32)
    want = heads.clone()
    normed = rms_norm(want[:, :4], None, 1e-6) * weight
    want[:, :4] = apply_rotary(normed.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    native.norm_rotate_(heads, weight, 1e-6, cos, sin, 4)
    torch.testing.assert_close(heads, want, atol=1e-6, rtol=1e-5)


@pytest.mark.reference
def test_bad_rows_are_refused_before_the_cache_is_touched(built):
    keys, values = torch.zeros(2, 1, 8, 16), torch.zeros(2, 1, 8, 16)
    qkv, cos, sin = torch.ones(3, 3 * 16), torch.ones(1, 3, 16), torch.zeros(1, 3, 16)
    cases = {"row 1 at slot 1 positions 7..8 is outside the cache": ([0, 1], [3, 7], [1, 2]),
             "slot 0 has two rows": ([0, 0], [1, 2], [1, 2]),
             "row 1 at slot 2 positions 0..1 is outside the cache": ([1, 2], [0, 0], [1, 2]),
             "the rows hold 4 tokens, qkv 3": ([0, 1], [0, 0], [2, 2])}
    for message, (slots, starts, lengths) in cases.items():
        with pytest.raises(RuntimeError, match=message):
            native.attention(qkv, None, 1e-6, cos, sin, keys, values, torch.tensor(slots), torch.tensor(starts),
                             torch.tensor(lengths), 1)
        assert not keys.any() and not values.any()
    with pytest.raises(RuntimeError, match="qkv width 40"):
        native.attention(torch.ones(3, 40), None, 1e-6, cos, sin, keys, values, torch.tensor([0, 1]),
                         torch.tensor([0, 0]), torch.tensor([1, 2]), 1)


@pytest.mark.reference
def test_decoding_rows_and_prompt_chunks_in_one_call_match_eager(built, family):
    """The engine's order: decoding rows first, then prompt chunks, on the native kernel; a
    slot's second row (a speculative catch-up beside its decoding row) keeps the whole call on
    torch's path."""
    runners = {mode: Runner(family, SlotCache(family.config, 4, 48), mode) for mode in ("eager", "packed")}
    assert runners["packed"].kernels.native
    calls = [([Row(0, 0, 5, length=6), Row(1, 0, 3, length=4), Row(2, 0, 5, length=2)], list(range(12))),
             ([Row(0, 6, 5), Row(1, 4, 3), Row(3, 0, 5, length=7)], list(range(30, 39))),
             ([Row(2, 4, 5), Row(0, 7, 5), Row(2, 2, 5, length=2)], [3, 4, 5, 6])]
    outputs = {mode: [out for rows, tokens in calls for out in runner.forward(rows, tokens=tokens)]
               for mode, runner in runners.items()}
    for eager, packed in zip(outputs["eager"], outputs["packed"]):
        torch.testing.assert_close(packed.logits, eager.logits, atol=1e-4, rtol=1e-4)


def test_a_failed_build_leaves_the_torch_path_running(family, monkeypatch):
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'familial_native': no compiler")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(native, "load", native.load.__wrapped__)
    with pytest.warns(RuntimeWarning, match="did not build.*no compiler"):
        kernels = Kernels(family, "packed")
        runners = [Runner(family, SlotCache(family.config, 3, 32), mode) for mode in ("eager", "packed")]
    assert kernels.mode == "packed" and not kernels.native and not runners[1].kernels.native
    rows = [Row(0, 0, 5, length=4), Row(1, 0, 3, length=2)]
    for eager, packed in zip(*(runner.forward(rows, tokens=list(range(6))) for runner in runners)):
        torch.testing.assert_close(packed.logits, eager.logits, atol=1e-4, rtol=1e-4)
