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
from familial.posttrain.grpo import GRPOConfig, GRPOTrainer, group_advantages, grpo_loss, load_config
from familial.posttrain.logprobs import token_logprobs
from familial.posttrain.rewards import (
    Rewards, RewardSpec, arithmetic_reward, extract_answer, load_reward, sum_problems)
from familial.posttrain.rollout import Rollout, RolloutEngine, SequenceBatch

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


def test_engine_rollouts_match_full_forward_greedy_and_see_updated_weights():
    model = tiny_family(vocab_size=13).eval()
    member = model.member(1)
    prompts = [[1, 10, 2, 11], [3, 11], [4, 5, 6]]
    engine = RolloutEngine(model, 1, slots=2, max_seq_len=16, stop_ids=set(), device=torch.device("cpu"))

    def reference(prompt):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(5):
                ids = torch.cat((ids, member(ids)[:, -1:].argmax(-1)), dim=1)
        return ids[0, len(prompt):].tolist()

    assert engine.greedy(prompts, 5).completions == [reference(p) for p in prompts]
    # An optimiser step changes the parameters in place: the same engine samples from them
    # (nothing in the engine may keep values derived from the weights across calls).
    with torch.no_grad():
        for p in member.parameters():
            p.add_(torch.randn_like(p))
    assert engine.greedy(prompts, 5).completions == [reference(p) for p in prompts]


def test_seeded_completions_do_not_depend_on_batch_company():
    model = tiny_family(vocab_size=13).eval()
    engine = RolloutEngine(model, 1, slots=8, max_seq_len=16, stop_ids={0}, device=torch.device("cpu"))
    prompts = [[1, 10, 2], [3, 11], [4, 5, 6, 7], [8]]
    together = engine.sample(prompts, 6, 1.0, seeds=[11, 12, 13, 14]).completions
    alone = [engine.sample([p], 6, 1.0, seeds=[s]).completions[0] for p, s in zip(prompts, [11, 12, 13, 14])]
    assert together == alone
    assert len({tuple(c) for c in engine.sample([prompts[0]] * 4, 6, 1.0, [1, 2, 3, 4]).completions}) > 1


def test_chunked_logprobs_equal_full_log_softmax_with_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).double()
    targets = torch.randint(0, 50, (37,))
    weights = torch.randn(37, dtype=torch.float64)
    full = torch.log_softmax(head(hidden) / 0.7, -1).gather(1, targets[:, None])[:, 0]
    want = torch.autograd.grad((full * weights).sum(), (hidden, head.weight))
    chunked = token_logprobs(hidden, head, targets, temperature=0.7, chunk_size=8)
    got = torch.autograd.grad((chunked * weights).sum(), (hidden, head.weight))
    assert torch.allclose(chunked.double(), full, atol=1e-6)
    for a, b in zip(got, want):
        assert torch.allclose(a.double(), b, atol=1e-6)


@pytest.mark.parametrize("trainable", [["branches.1.*"], ["*"]])
def test_policy_and_reference_log_probs_equal_a_per_sequence_forward(trainable):
    # The branch alone trains: the trunk runs once per batch for policy and reference; with
    # everything trainable there is no frozen prefix.
    model = tiny_family(vocab_size=len(CHARS))
    config = GRPOConfig(family="", output="", member=1, trainable=trainable, temperature=2.0, device="cpu")
    trainer = GRPOTrainer(model, char_tokenizer(), arithmetic_reward, sum_problems(2), config)
    member = model.member(1)
    rollout = Rollout([[1, 10, 2, 11], [3, 11]], [[5, 6, 0], [7]])
    batch = SequenceBatch.of(rollout, pad_id=0, device=torch.device("cpu"))
    assert batch.mask.tolist() == [[1, 1, 1], [1, 0, 0]]

    def expected():
        rows = []
        for prompt, completion in zip(rollout.prompts, rollout.completions):
            with torch.no_grad():
                logits = member(torch.tensor([prompt + completion]))[0, len(prompt) - 1:-1] / 2.0
            rows.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0])
        return rows

    def close(got, want):
        return all(torch.allclose(got[b, :len(w)], w, atol=1e-5) for b, w in enumerate(want))

    start = expected()
    assert close(trainer.logprobs(batch, trainer.frozen_prefix(batch)), start)
    with torch.no_grad():
        for p in trainer.parameters:
            p.add_(0.05 * torch.randn_like(p))
    assert not close(trainer.logprobs(batch, trainer.frozen_prefix(batch)), start)
    assert close(trainer.logprobs(batch, trainer.frozen_prefix(batch)), expected())
    assert close(trainer.reference_logprobs(batch, trainer.frozen_prefix(batch)), start)
    # Only the trainable parameters are copied for the reference.
    assert sum(t.numel() for t in trainer.reference) == sum(p.numel() for p in trainer.parameters)


def test_reward_list_weighs_verifiable_format_length_and_dotted_path_rewards():
    rewards = Rewards([RewardSpec("arithmetic"), RewardSpec("format", 0.5, pattern=r"\d+"),
                       RewardSpec("length", 0.25, target=2),
                       RewardSpec("familial.posttrain.rewards.arithmetic_reward", 2.0)])
    totals, parts = rewards.scores(["", "", ""], ["7", "x 7", "77777"], ["7", "7", "7"])
    assert parts["format"] == [1.0, 0.0, 1.0] and parts["length"] == [1.0, 0.5, 0.0]
    assert totals == [1 + 0.5 + 0.25 + 2, 1 + 0 + 0.25 * 0.5 + 2, 0 + 0.5 + 0 + 0]
    with pytest.raises(ConfigError, match="needs 'pattern'"):
        Rewards([RewardSpec("format")])


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
        '[task]\nkind = "sums"\nmax_operand = 4\n'
        '[[reward]]\nname = "arithmetic"\n[[reward]]\nname = "format"\nweight = 0.5\npattern = "\\\\d+"\n')
    config = load_config(tmp_path / "grpo.toml")
    assert config.task.max_operand == 4 and config.reward[1].pattern == "\\d+"
    assert main(["grpo", str(tmp_path / "grpo.toml")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "grpo.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"reward", "reward/arithmetic", "reward/format", "kl", "clip_fraction", "loss", "completion_tokens",
            "rollout_s", "update_s"} <= set(records[0])
    assert "held_out_accuracy" in records[-1]
    assert load_family(tmp_path / "run" / "family").config.exits == [0, 1]
    (tmp_path / "bad.toml").write_text('family = "family"\noutput = "x"\nmember = 0\ngroup_size = 1\n')
    assert main(["grpo", str(tmp_path / "bad.toml")]) == 2
    assert "field 'group_size' = 1 is out of range" in capsys.readouterr().err


def test_bf16_compute_keeps_float32_master_weights():
    model = tiny_family(vocab_size=len(CHARS), num_hidden_layers=2, exits=[0, 1], eos_token_id=0)
    config = GRPOConfig(family="", output="", member=0, prompts_per_step=2, group_size=2, max_new_tokens=2,
                        learning_rate=1e-3, precision="bf16", device="cpu")
    trainer = GRPOTrainer(model, char_tokenizer(), arithmetic_reward, sum_problems(4), config)
    batch = SequenceBatch.of(Rollout([[1, 10, 2, 11]], [[3, 0]]), pad_id=0, device=torch.device("cpu"))
    low = trainer.logprobs(batch, trainer.frozen_prefix(batch))
    trainer.autocast = None
    full = trainer.logprobs(batch, trainer.frozen_prefix(batch))
    assert low.dtype == torch.float32 and torch.allclose(low, full, atol=0.05) and not torch.equal(low, full)
    trainer.autocast = torch.bfloat16
    record = trainer.step()
    assert math.isfinite(record["loss"]) and all(p.dtype == torch.float32 for p in trainer.parameters)


def test_prompts_per_step_must_split_evenly_over_processes():
    from familial.posttrain.grpo import DataParallel

    parallel = DataParallel()
    parallel.size = 3
    model = tiny_family(vocab_size=len(CHARS), num_hidden_layers=2, exits=[0, 1], eos_token_id=0)
    config = GRPOConfig(family="", output="", member=0, prompts_per_step=4, device="cpu")
    with pytest.raises(ConfigError, match="prompts_per_step = 4 is not a multiple of the 3 processes"):
        GRPOTrainer(model, char_tokenizer(), arithmetic_reward, sum_problems(4), config, parallel)


@pytest.mark.parametrize("task, message", [
    ('kind = "lines"', r"field 'task.kind' = 'lines': expected 'sums' or 'jsonl'"),
    ('kind = "jsonl"', r"field 'task.path' = None: task.kind = 'jsonl' needs task.path"),
    ("held_out = 1.0", r"field 'task.held_out' = 1.0: expected a number in \[0, 1\)"),
    ("max_operand = -1", r"field 'task.max_operand' = -1: expected 0 or more")])
def test_a_bad_task_table_is_named_before_anything_runs(tmp_path, task, message):
    (tmp_path / "grpo.toml").write_text(f'family = "f"\noutput = "o"\nmember = 0\n[task]\n{task}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "grpo.toml")
