"""Frozen-trunk exits: the exit cache holds the trunk's own states and teacher, and training
from it equals training through the frozen model, touching only the branches."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from familial.checkpoint_io import save_family
from familial.config import FamilyConfig
from familial.data.shards import open_shards
from familial.model import FamilyModel
from familial.train.branches import (BranchTrainConfig, BranchTrainer, evaluate_exits, exit_pass, topk_kl,
                                     train_branches)
from familial.train import exit_cache
from familial.train.exit_cache import CacheError, ExitCache, trunk_parameters, write_exit_cache

SEQ, TOP_K = 12, 8
VOCAB = 53  # the `shards` fixture's vocabulary


def tiny_family(seed: int = 0, llama: bool = False) -> FamilyModel:
    """Qwen3 with a head per exit, or Llama (SmolLM2's layout): no q/k norms, every member's
    head the tied embedding."""
    torch.manual_seed(seed)
    config = FamilyConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, exits=[1, 2, 3], qk_norm=not llama,
                          tie_word_embeddings=llama, shared_head=llama, max_position_embeddings=64)
    model = FamilyModel(config)
    with torch.no_grad():  # branches as import starts them: a copy of the next trunk layer
        for e in config.exits[:-1]:
            model.branches[str(e)].layers[0].load_state_dict(model.model.layers[str(e)].state_dict())
            if not llama:
                model.branches[str(e)].lm_head.weight.copy_(model.lm_head.weight)
    return model.eval()


@pytest.fixture(params=["qwen3", "llama"])
def cached(request, tmp_path, shards, monkeypatch):
    # 20-token head chunks: a batch of 3 windows of 12 runs the head in two uneven chunks.
    monkeypatch.setattr(exit_cache, "HEAD_CHUNK_BYTES", 20 * 4 * VOCAB)
    model = tiny_family(llama=request.param == "llama")
    shards = open_shards(shards)
    write_exit_cache(model, shards, tmp_path / "cache", seq_len=SEQ, top_k=TOP_K, hidden_dtype="float32",
                     batch_size=3)
    return model, shards, ExitCache(tmp_path / "cache")


def test_cache_holds_the_trunks_states_and_the_full_members_top_k(cached):
    model, shards, cache = cached
    assert cache.rows == (shards.num_tokens - 1) // SEQ
    row = 5
    tokens = torch.from_numpy(np.array(cache.tokens[row], dtype=np.int64))
    start = int(shards.documents[0]) + row * SEQ
    assert tokens.tolist() == shards.tokens[start:start + SEQ + 1].tolist()
    seen = {}

    def grab(layer):
        return lambda module, inputs: seen.__setitem__(layer, inputs[0].detach())

    hooks = [model.model.layers[str(e)].register_forward_pre_hook(grab(e)) for e in (1, 2)]
    with torch.no_grad():
        logits = model(tokens[None, :-1], exits=[3])[3][0]
    for hook in hooks:
        hook.remove()
    for e in (1, 2):
        torch.testing.assert_close(torch.from_numpy(np.array(cache.hidden[e][row])), seen[e][0])
    log_probs = torch.log_softmax(logits, -1)
    values, ids = log_probs.topk(TOP_K, -1)
    assert torch.equal(torch.from_numpy(np.array(cache.top_ids[row], dtype=np.int64)), ids)
    torch.testing.assert_close(torch.from_numpy(np.array(cache.top_logprobs[row])), values)
    nll = -log_probs.gather(-1, tokens[1:, None])[:, 0]
    torch.testing.assert_close(torch.from_numpy(np.array(cache.teacher_nll[row])), nll)


def test_float16_cache_is_the_float32_one_rounded(cached, tmp_path):
    model, shards, cache = cached
    write_exit_cache(model, shards, tmp_path / "half", seq_len=SEQ, top_k=TOP_K, max_tokens=3 * SEQ)
    half = ExitCache(tmp_path / "half")
    assert half.rows == 3 and half.hidden[2].dtype == np.float16
    spread = np.arange(3) * cache.rows // 3  # a cap takes windows from the whole stream
    assert np.array_equal(half.tokens, cache.tokens[spread])
    assert np.array_equal(half.hidden[2], cache.hidden[2][spread].astype(np.float16))


def topk_kl_reference(log_q, teacher_log_p, k):
    """KL of the (k + 1)-outcome coarsening, written the long way from both full distributions."""
    values, ids = teacher_log_p.topk(k, -1)
    p_tail = 1 - values.exp().sum(-1)
    q_top = log_q.gather(-1, ids).exp()
    q_tail = 1 - q_top.sum(-1)
    return (values.exp() * (values - q_top.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())


def test_topk_kl_is_the_kl_of_the_coarsened_distributions():
    torch.manual_seed(0)
    log_q = torch.log_softmax(torch.randn(6, 40, dtype=torch.float64), -1)
    log_p = torch.log_softmax(torch.randn(6, 40, dtype=torch.float64) * 2, -1)
    values, ids = log_p.topk(5, -1)
    torch.testing.assert_close(topk_kl(log_q, ids, values), topk_kl_reference(log_q, log_p, 5))
    # All the teacher's mass inside the k: plain KL over those tokens, no tail term left.
    values, ids = log_q.topk(40, -1)
    assert torch.allclose(topk_kl(log_q, ids, values), torch.zeros(6, dtype=torch.float64), atol=1e-10)


def reference_gradients(model, tokens, config):
    """The same objective through the frozen model's own forward (trunk run with no cache)."""
    model = copy.deepcopy(model)
    trainer = BranchTrainer(model, config, [1, 2])
    logits = model(tokens[:, :-1])
    teacher = torch.log_softmax(logits[3].detach(), -1)
    values, ids = teacher.topk(TOP_K, -1)
    targets = tokens[:, 1:]
    total = 0
    for e in (1, 2):
        log_q = torch.log_softmax(logits[e], -1).flatten(0, 1)
        kl = topk_kl(log_q, ids.flatten(0, 1), values.flatten(0, 1))
        ce = torch.nn.functional.cross_entropy(log_q, targets.flatten(), reduction="none")
        total = total + (config.kl_weight * kl + config.ce_weight * ce).mean()
    total.backward()
    trunk_grads = [p.grad for p in trunk_parameters(model).values()]
    return {name: p.grad for name, p in trainer.parameters.items()}, trunk_grads


def test_training_from_the_cache_has_the_gradients_of_training_through_the_frozen_model(cached):
    model, _, cache = cached
    config = BranchTrainConfig(train_head=True, kl_weight=1.0, ce_weight=0.5)
    rows = np.array([0, 4, 7])
    tokens = torch.from_numpy(np.array(cache.tokens[rows], dtype=np.int64))
    expected, trunk_grads = reference_gradients(model, tokens, config)
    assert all(g is None for g in trunk_grads)
    trainer = BranchTrainer(model, config, [1, 2])
    for e in (1, 2):
        exit_pass(model, e, cache.batch(rows, e), config.kl_weight, config.ce_weight, backward=True)
    assert set(trainer.parameters) == set(expected)
    # A head of its own trains when asked; the tied embedding (Llama here) never does.
    assert any(name.endswith("lm_head.weight") for name in expected) == (not model.config.shared_head)
    for name, p in trainer.parameters.items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6)


def test_bf16_head_gives_nearly_the_float32_gradients(cached):
    model, _, cache = cached
    rows = np.array([1, 2])
    grads = []
    for bf16 in (False, True):
        trainer = BranchTrainer(model, BranchTrainConfig(), [2])
        exit_pass(model, 2, cache.batch(rows, 2), 1.0, 0.5, backward=True, bf16_head=bf16)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.parameters.values()]))
        trainer.optimizer.zero_grad(set_to_none=True)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_training_moves_only_the_branches_and_lowers_their_loss(cached, tmp_path):
    model, shards, cache = cached
    trunk = {name: p.detach().clone() for name, p in trunk_parameters(model).items()}
    heads = {e: model.exit_head(e).weight.detach().clone() for e in (1, 2)}
    with torch.no_grad():  # branches far from the teacher, so distillation has work to do
        for e in (1, 2):
            for p in model.branches[str(e)].layers.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    before = evaluate_exits(model, cache, [1, 2])
    config = BranchTrainConfig(epochs=3, lr=3e-3, warmup_steps=2, ce_weight=0.0)
    summary = train_branches(model, cache, config, log=None)
    after = evaluate_exits(model, cache, [1, 2])
    assert summary["steps"] == 3 * -(-cache.rows // 4)
    for name, p in trunk_parameters(model).items():
        assert torch.equal(p, trunk[name]), name
        assert p.grad is None
    for e in (1, 2):
        assert torch.equal(model.exit_head(e).weight, heads[e])  # train_head defaults to off
        assert after["exits"][str(e)]["kl_topk"] < before["exits"][str(e)]["kl_topk"]
    assert after["full_loss"] == before["full_loss"]


def test_a_tied_head_stays_frozen_even_when_heads_train():
    model = tiny_family(llama=True)
    trainer = BranchTrainer(model, BranchTrainConfig(train_head=True), [1])
    assert all("lm_head" not in name and "embed" not in name for name in trainer.parameters)


def test_a_cache_from_another_trunk_or_without_the_exit_is_refused(cached, tmp_path):
    model, _, cache = cached
    other = tiny_family(seed=1)
    with pytest.raises(CacheError, match="made from another trunk"):
        cache.check_family(other, [1, 2])
    with pytest.raises(CacheError, match=r"holds exits \[1, 2\], not \[3\]"):
        cache.check_family(model, [3])
    changed_branch = copy.deepcopy(model)
    with torch.no_grad():
        changed_branch.branches["1"].norm.weight.add_(1)
    cache.check_family(changed_branch, [1, 2])  # branches are not part of the trunk


def test_the_cache_is_written_atomically(tmp_path, shards):
    model = tiny_family()
    shards = open_shards(shards)
    calls = []

    def fail(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_exit_cache(model, shards, tmp_path / "cache", seq_len=SEQ, top_k=TOP_K, batch_size=2, progress=fail)
    assert not (tmp_path / "cache").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]
    with pytest.raises(CacheError, match="not an exit cache"):
        ExitCache(tmp_path / "shards")


def exits_toml(tmp_path, shards, more: str = "") -> Path:
    """An exits config in tmp_path: family, output and cache there, `more` appended to [cache]."""
    config = tmp_path / "exits.toml"
    config.write_text(f"""
family = "{tmp_path / 'family'}"
output = "{tmp_path / 'trained'}"
[cache]
data = "{shards}"
path = "{tmp_path / 'cache'}"
seq_len = {SEQ}
{more}
""")
    return config


def test_cli_caches_trains_and_writes_a_family_whose_trunk_is_unchanged(tmp_path, shards, capsys):
    from familial.cli import main

    model = tiny_family()
    save_family(model, tmp_path / "family")
    config = exits_toml(tmp_path, shards, f'held_out = "{shards}"\ntop_k = {TOP_K}\n[train]\nepochs = 2\nlr = 3e-3')
    assert main(["exits", "cache", str(config)]) == 0
    assert main(["exits", "train", str(config), "--train.epochs", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train"]["steps"] == -(-ExitCache(tmp_path / "cache").rows // 4)
    for e in ("1", "2"):
        assert summary["after"]["exits"][e]["loss"] < summary["before"]["exits"][e]["loss"]
    assert main(["exits", "eval", str(config), "--family", str(tmp_path / "trained")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["exits"]["1"]["loss"] == summary["after"]["exits"]["1"]["loss"]
    assert evaluated["exits"]["1"]["truncated_loss"] == summary["before"]["exits"]["1"]["truncated_loss"]
    from familial.checkpoint_io import load_family

    trained = load_family(tmp_path / "trained")
    for name, p in trunk_parameters(trained).items():
        assert torch.equal(p, dict(model.named_parameters(remove_duplicate=False))[name]), name
    assert not torch.equal(trained.branches["1"].layers[0].mlp.up_proj.weight,
                           model.branches["1"].layers[0].mlp.up_proj.weight)
    # Another family's trunk is refused, in one line.
    save_family(tiny_family(seed=2), tmp_path / "other")
    assert main(["exits", "train", str(config), "--family", str(tmp_path / "other"),
                 "--output", str(tmp_path / "t2")]) == 2
    assert "made from another trunk" in capsys.readouterr().err
    assert not (tmp_path / "t2").exists()


@pytest.mark.parametrize("override, message", [
    (["--cache.top_k", "0"], "[cache]: field 'top_k' = 0: expected a positive integer"),
    (["--cache.tokens", "5"], "[cache]: field 'tokens' = 5: expected at least seq_len (12), or omitted"),
    (["--threads", "0"], "field 'threads' = 0: expected a positive integer"),
    (["--train.batch_size", "0"], "[train]: field 'batch_size' = 0: expected a positive integer"),
])
def test_a_bad_exits_config_is_refused_naming_file_and_field(tmp_path, capsys, override, message):
    from familial.cli import main

    config = exits_toml(tmp_path, tmp_path / "shards")
    assert main(["exits", "cache", str(config), *override]) == 2
    error = capsys.readouterr().err
    assert f"{config}: " in error and message in error
    assert not (tmp_path / "cache").exists()
