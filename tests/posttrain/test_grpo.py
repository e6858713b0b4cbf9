"""GRPO: the loss on a fixed batch, the sampler, rewards, and learning a toy task."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from familial.checkpoint_io import load_family, save_family
from familial.cli import main
from familial.config import ConfigError
from familial.posttrain.grpo import (
    GRPOConfig, GRPOTrainer, generate, group_advantages, grpo_loss, load_config)
from familial.posttrain.rewards import arithmetic_reward, extract_answer, load_reward, sum_problems

from posttrain_family import tiny_family

CHARS = ["<eos>", *"0123456789+="]


def char_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["<eos>"])
    return tokenizer


def test_grpo_loss_matches_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
    old = torch.tensor([[-1.2, -1.9, -0.5], [0.0, -1.2, -9.0]])
    ref = torch.tensor([[-1.1, -2.0, -0.7], [-0.3, -1.0, -9.0]])
    advantages = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    eps, beta = 0.2, 0.1
    terms, clipped = [], 0
    for i, a in enumerate([1.5, -0.5]):
        for t in range(3):
            if not mask[i, t]:
                continue
            ratio = math.exp(logp[i, t] - old[i, t])
            bounded = min(max(ratio, 1 - eps), 1 + eps)
            objective = min(ratio * a, bounded * a)
            delta = float(ref[i, t] - logp[i, t])
            kl = math.exp(delta) - delta - 1
            terms.append(-objective + beta * kl)
            clipped += (ratio > 1 + eps and a > 0) or (ratio < 1 - eps and a < 0)
    loss, stats = grpo_loss(logp, old, ref, advantages, mask, eps, beta)
    assert math.isclose(float(loss), sum(terms) / 5, rel_tol=1e-6)
    assert stats["clip_fraction"] == pytest.approx(clipped / 5) and clipped == 2


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    advantages = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0, 0, 0]).std()
    assert torch.allclose(advantages[:4], (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (std + 1e-4))
    assert torch.equal(advantages[4:], torch.zeros(4))


def test_arithmetic_reward_reads_final_answers_exactly():
    assert arithmetic_reward("", "3 + 4 = 7", "7") == 1.0
    assert arithmetic_reward("", "#### 1,234", "1234") == 1.0
    assert arithmetic_reward("", "so \\boxed{3/4}", "0.75") == 1.0
    assert arithmetic_reward("", "77", "7") == 0.0
    assert arithmetic_reward("", "no idea", "7") == 0.0
    assert extract_answer("a 1 b 22") == "22"
    assert load_reward("familial.posttrain.rewards:arithmetic_reward") is arithmetic_reward
    with pytest.raises(ConfigError, match="module:function"):
        load_reward("nonsense")


def test_cached_batched_sampler_matches_full_forward_greedy():
    model = tiny_family(vocab_size=13).eval()
    member = model.member(1)
    prompts = [[1, 10, 2, 11], [3, 11], [4, 5, 6]]
    rollout = generate(member, prompts, 5, 0.0, stop_ids=set(), pad_id=0)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(5):
                ids = torch.cat((ids, member(ids)[:, -1:].argmax(-1)), dim=1)
        assert rollout.completions[row].tolist() == ids[0, len(prompt):].tolist()
    assert rollout.completion_mask.all()


@pytest.fixture
def one_thread():
    # Many tiny ops: on a shared 2-core machine a second thread only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reward_rises_on_small_sums_and_other_members_stay_unchanged(one_thread):
    # Single-digit answers: a + b <= 9 with operands 0..4; every answer is one token.
    torch.manual_seed(0)
    model = tiny_family(vocab_size=len(CHARS), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, exits=[0, 1], eos_token_id=0)
    problems = sum_problems(4)
    config = GRPOConfig(family="", output="", member=0, steps=150, prompts_per_step=16,
                        group_size=8, max_new_tokens=2, learning_rate=3e-3, beta=0.04,
                        updates_per_batch=2, seed=0)
    trainer = GRPOTrainer(model, char_tokenizer(), arithmetic_reward, problems, config)
    final_member = {n: p.detach().clone() for n, p in model.member(1).named_parameters()}
    before = trainer.accuracy(problems)
    rewards = [trainer.step()["reward"] for _ in range(config.steps)]
    after = trainer.accuracy(problems)
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    print(f"reward first 20 steps {first:.3f}, last 20 {last:.3f}; "
          f"greedy accuracy {before:.3f} -> {after:.3f}")
    assert last > first + 0.3 and after > before + 0.3
    for name, param in model.member(1).named_parameters():
        assert torch.equal(param, final_member[name]), name


def test_grpo_command_runs_from_toml_and_logs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = tiny_family(vocab_size=len(CHARS), num_hidden_layers=2, exits=[0, 1], eos_token_id=0)
    save_family(model, tmp_path / "family")
    char_tokenizer().save(str(tmp_path / "family" / "tokenizer.json"))
    (tmp_path / "grpo.toml").write_text(
        'family = "family"\noutput = "run"\nmember = 0\nsteps = 3\nprompts_per_step = 2\n'
        'group_size = 4\nmax_new_tokens = 2\nlearning_rate = 1e-3\nupdates_per_batch = 2\n'
        '[task]\nkind = "sums"\nmax_operand = 4\n')
    assert load_config(tmp_path / "grpo.toml").task.max_operand == 4
    assert main(["grpo", str(tmp_path / "grpo.toml")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "grpo.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"reward", "kl", "clip_fraction", "loss"} <= set(records[0])
    assert "held_out_accuracy" in records[-1]
    assert load_family(tmp_path / "run" / "family").config.exits == [0, 1]
    (tmp_path / "bad.toml").write_text('family = "family"\noutput = "x"\nmember = 0\ngroup_size = 1\n')
    assert main(["grpo", str(tmp_path / "bad.toml")]) == 2
    assert "field 'group_size' = 1 is out of range" in capsys.readouterr().err
