"""SVD-LLM v2 compression: calibration statistics, optimal truncation, rank allocation, I/O."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from familial.checkpoint_io import export_member, load_family, save_family
from familial.cli import main
from familial.config import ConfigError
from familial.model import LowRankLinear
from familial.posttrain.compress import (
    allocate_ratios, calibration_batches, collect_covariances, compress_member, merge_low_rank,
    plan_compression, rank_for_ratio, truncate)
from familial.posttrain.expand import expand_member
from familial.summary import summarize

from posttrain_family import tiny_family


@pytest.fixture
def family():
    return tiny_family()


def _anisotropic(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """(n, tokens) activations with a few dominant, correlated directions, like real ones."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, n, dtype=torch.float64)
    mixing = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return mixing @ (scales[:, None] * torch.randn(n, tokens, generator=g, dtype=torch.float64))


def test_covariance_equals_brute_force_x_transpose_x_without_padding(family):
    ids = torch.randint(0, 61, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    batches = [(ids[:2], mask[:2]), (ids[2:], mask[2:])]
    names = ["branches.1.lm_head", "branches.1.layers.0.self_attn.q_proj"]
    stats = collect_covariances(family, 1, names, batches)
    with torch.no_grad():
        head_inputs = torch.cat([family(i, attention_mask=m, exits=[1], return_hidden=True)[1][m.bool()]
                                 for i, m in batches]).double()
        q_inputs = []
        for i, m in batches:
            hidden = family.model.embed_tokens(i)
            positions = torch.arange(i.shape[1]).expand_as(i)
            rotary = family.rotary(positions, hidden.dtype)
            from familial.model import attention_mask_4d
            hidden = family.model.layers["0"](hidden, rotary, attention_mask_4d(m, i.shape[1]))
            q_inputs.append(family.branches["1"].layers[0].input_layernorm(hidden)[m.bool()])
        q_inputs = torch.cat(q_inputs).double()
    assert stats["branches.1.lm_head"].tokens == int(mask.sum()) == 10 + 6 + 3
    torch.testing.assert_close(stats["branches.1.lm_head"].matrix, head_inputs.T @ head_inputs,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats[names[1]].matrix, q_inputs.T @ q_inputs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tokens", [200, 20])  # full-rank and rank-deficient calibration data
def test_truncation_error_is_the_theoretical_minimum(tokens):
    w = torch.randn(24, 32, dtype=torch.float64)
    x = _anisotropic(32, tokens)
    sigma = torch.linalg.svdvals(w @ x)
    for rank in (1, 5, 12):
        up, down = truncate(w, x @ x.T, rank)
        error = torch.linalg.norm(w @ x - up @ down @ x)
        assert math.isclose(error, sigma[rank:].pow(2).sum().sqrt(), rel_tol=1e-9, abs_tol=1e-9)


def test_full_rank_factors_reconstruct_the_layer():
    w = torch.randn(20, 12)
    x = _anisotropic(12, 100).float()
    for method in ("eigen", "cholesky", "svd"):
        up, down = truncate(w, (x @ x.T).double(), 12, method)
        layer = LowRankLinear(12, 20, 12)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
        torch.testing.assert_close(layer(x.T), x.T @ w.T, atol=1e-4, rtol=1e-4)


def test_whitened_truncation_beats_plain_svd_on_activations():
    w = torch.randn(48, 64, dtype=torch.float64)
    x = _anisotropic(64, 500, seed=1)
    for rank in (4, 16, 32):
        errors = {}
        for method in ("eigen", "svd"):
            up, down = truncate(w, x @ x.T, rank, method)
            errors[method] = torch.linalg.norm(w @ x - up @ down @ x)
        assert errors["eigen"] < 0.9 * errors["svd"], (rank, errors)


def test_cholesky_on_singular_covariance_needs_damping():
    w = torch.randn(16, 32, dtype=torch.float64)
    x = _anisotropic(32, 10)
    with pytest.raises(ConfigError, match="damping"):
        truncate(w, x @ x.T, 4, "cholesky", name="q_proj")
    up, down = truncate(w, x @ x.T, 4, "cholesky", damping=1e-3)
    assert up.shape == (16, 4) and down.shape == (4, 32)


def test_rank_allocation_gives_more_rank_to_larger_loss_and_keeps_the_budget():
    for losses in ([5.0, 50.0, 500.0], [0.01, 0.1, 1.0, 3.0], [0.0, 2.0, 4.0]):
        ratios = allocate_ratios(losses, 0.4, cap=0.95)
        assert math.isclose(sum(ratios) / len(ratios), 0.4, rel_tol=1e-9)
        assert all(0 <= r <= 0.95 for r in ratios)
        assert ratios == sorted(ratios, reverse=True), (losses, ratios)
        ranks = [rank_for_ratio(64, 96, r) for r in ratios]
        assert ranks == sorted(ranks) and ranks[0] < ranks[-1]


def test_plan_gives_more_rank_to_the_matrix_with_larger_truncation_loss(family):
    expand_member(family, 1, blocks=2, seed=0)
    with torch.no_grad():
        for layer in family.branches["1"].layers[1:]:
            layer.self_attn.o_proj.weight.normal_(0, 0.02)
            layer.mlp.down_proj.weight.normal_(0, 0.02)
        family.branches["1"].layers[2].self_attn.q_proj.weight.mul_(30)
    names = ["branches.1.layers.1.self_attn.q_proj", "branches.1.layers.2.self_attn.q_proj"]
    batches = list(calibration_batches(torch.randint(0, 61, (8, 24)), 8, 24))
    covariances = collect_covariances(family, 1, names, batches)
    plans = {p.name: p for p in plan_compression(family, covariances, 0.5)}
    small, large = plans[names[0]], plans[names[1]]
    assert large.loss_at_target > small.loss_at_target
    assert large.rank > small.rank
    assert small.rank + large.rank <= 2 * rank_for_ratio(64, 64, 0.5) + 1


@pytest.mark.reference
def test_compressed_family_counts_loads_merges_and_exports(family, tmp_path):
    expand_member(family, 1, blocks=2, seed=0)
    with torch.no_grad():
        for layer in family.branches["1"].layers[1:]:
            layer.self_attn.o_proj.weight.normal_(0, 0.02)
            layer.mlp.down_proj.weight.normal_(0, 0.02)
    before = sum(p.numel() for p in family.parameters())
    batches = calibration_batches(torch.randint(0, 61, (16, 32)), 16, 32)
    plans = compress_member(family, 1, batches, ratio=0.4)
    assert len(plans) == 2 * 7 + 1
    for plan in plans:
        module = family.get_submodule(plan.name)
        if plan.rank is None:
            assert isinstance(module, torch.nn.Linear)
        else:
            assert sum(p.numel() for p in module.parameters()) == plan.rank * (plan.rows + plan.cols)
    removed = sum(p.dense_parameters - p.parameters for p in plans)
    assert sum(p.numel() for p in family.parameters()) == before - removed
    dense = sum(p.dense_parameters for p in plans)
    # ranks are floored, so slightly more than the target ratio goes
    assert 0.4 <= removed / dense < 0.45
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        expected = family(ids, exits=[1, 3])
    save_family(family, tmp_path / "small")
    loaded = load_family(tmp_path / "small")
    small = summarize(loaded.config).members[0]
    assert small.parameters == sum(p.numel() for p in family.member(1).parameters())
    with torch.no_grad():
        assert torch.equal(loaded(ids, exits=[1])[1], expected[1])
    export_member(tmp_path / "small", tmp_path / "dense", 1)
    merged = merge_low_rank(loaded)
    assert len(merged) == len(family.config.low_rank) and not loaded.config.low_rank
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, exits=[1])[1], expected[1], atol=1e-5, rtol=1e-5)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
        torch.testing.assert_close(hf(ids).logits, expected[1], atol=1e-5, rtol=1e-5)


def test_merge_refuses_a_listed_module_that_is_not_low_rank_and_changes_nothing(family):
    first = family.factorize("model.layers.0.mlp.up_proj", 4)
    family.config.low_rank["model.layers.0.mlp.down_proj"] = 4  # listed, but still dense
    listed = dict(family.config.low_rank)
    with pytest.raises(ConfigError, match="model.layers.0.mlp.down_proj: listed in config.low_rank but is Linear"):
        merge_low_rank(family)
    assert family.config.low_rank == listed
    assert family.get_submodule("model.layers.0.mlp.up_proj") is first


def test_cli_expand_then_compress(family, tmp_path, capsys):
    save_family(family, tmp_path / "family")
    torch.save(torch.randint(0, 61, (12, 20)), tmp_path / "calib.pt")
    assert main(["expand", str(tmp_path / "family"), str(tmp_path / "wide"), "--member", "1",
                 "--blocks", "2", "--init", "clone"]) == 0
    assert load_family(tmp_path / "wide").config.branch_layers == [3]
    assert main(["compress", str(tmp_path / "wide"), str(tmp_path / "thin"), "--member", "1",
                 "--ratio", "0.4", "--calibration", str(tmp_path / "calib.pt"), "--samples", "8",
                 "--targets", "branches.1.layers.*.mlp.*,branches.1.lm_head"]) == 0
    thin = load_family(tmp_path / "thin")
    kinds = {n.rsplit(".", 1)[-1] for n in thin.config.low_rank}
    assert kinds == {"gate_proj", "up_proj", "down_proj", "lm_head"}
    assert main(["compress", str(tmp_path / "wide"), str(tmp_path / "bad"), "--member", "1",
                 "--ratio", "0.4", "--calibration", str(tmp_path / "calib.pt"),
                 "--targets", "nothing.*"]) == 2
    assert "match no dense linear" in capsys.readouterr().err


def test_calibration_from_token_shards_pads_documents_and_masks_the_padding(tmp_path):
    from familial.data.shards import write_shards

    write_shards(tmp_path / "shards", [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]], vocab_size=61)
    batches = list(calibration_batches(tmp_path / "shards", samples=3, seq_len=4, batch_size=2))
    assert [ids.tolist() for ids, _ in batches] == [[[5, 6, 7, 0], [8, 9, 10, 11]], [[14]]]
    assert [mask.tolist() for _, mask in batches] == [[[1, 1, 1, 0], [1, 1, 1, 1]], [[1]]]
    with pytest.raises(ConfigError, match="shard directory"):
        list(calibration_batches(tmp_path / "ids.txt", 2, 4))
