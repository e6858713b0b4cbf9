"""GRPO (group relative policy optimisation) of one member against verifiable rewards.

Each step samples `prompts_per_step` problems, draws `group_size` completions for each from
the policy member (batched, KV-cached), scores them with a reward callable and trains on

    A_i    = (r_i - mean(r_group)) / (std(r_group) + 1e-4)       (unbiased std, as TRL)
    ratio  = exp(logp - logp_old)
    obj    = min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon) A)
    kl     = exp(ref - logp) - (ref - logp) - 1                  (k3 estimator)
    loss   = sum over active completion tokens of (beta kl - obj) / number of active tokens

The normalisation is token-level over the whole batch (TRL/DAPO's "token" loss type): long
and short completions weigh the same per token. `beta` defaults to 0.04 (TRL's historical
default); 0 skips the reference model. Log-probabilities use logits / temperature, the
distribution the completions were sampled from. With `updates_per_batch` = 1 the ratio is
exactly 1 and the clip never fires; more updates per batch reuse the samples off-policy.
Policy and reference are members of a family: the reference is a frozen copy of the policy
member taken at the start. Only parameters matching `trainable` change.
"""

from __future__ import annotations

import copy
import json
import random
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from familial.config import ConfigError, FamilyConfig, from_dict
from familial.model import FamilyMember, FamilyModel, KVCache
from familial.posttrain.expand import freeze_except, trainable_parameter_patterns
from familial.posttrain.rewards import Reward, load_reward, split_problems, sum_problems

Problem = tuple[str, str]


@dataclass
class TaskConfig:
    # "sums": every '{a}+{b}=' prompt with operands up to max_operand (the toy verifiable
    # task); "jsonl": `path` holds one {"prompt": ..., "answer": ...} object per line.
    kind: str = "sums"
    path: str | None = None
    max_operand: int = 9
    # prompt text with {a} and {b}; may hold a chat template's markup.
    template: str = "{a}+{b}="
    # fraction of problems kept out of training, for the accuracy figures.
    held_out: float = 0.2


@dataclass
class GRPOConfig:
    # family checkpoint to start from, and the run directory (log + final family/).
    family: str
    output: str
    # exit layer or alias of the policy member.
    member: int | str
    # tokenizer.json; default: the family directory's.
    tokenizer: str | None = None
    task: TaskConfig = field(default_factory=TaskConfig)
    # "arithmetic", "math_verify" or "package.module:function" (prompt, completion, answer) -> float.
    reward: str = "arithmetic"
    # glob patterns of trainable parameters; empty: an expanded member's new blocks, norm and
    # head, else the member's own branch (other members untouched), or everything for the
    # final member (its layers are the trunk every member shares).
    trainable: list[str] = field(default_factory=list)
    steps: int = 200
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    # generation also stops at these tokens (besides the family's eos_token_id).
    stop_tokens: list[str] = field(default_factory=list)
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epsilon: float = 0.2
    beta: float = 0.04
    updates_per_batch: int = 1
    # greedy accuracy on the held-out problems every this many steps (0: start and end only).
    eval_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"steps": self.steps >= 1, "prompts_per_step": self.prompts_per_step >= 1,
                  "group_size": self.group_size >= 2, "max_new_tokens": self.max_new_tokens >= 1,
                  "temperature": self.temperature > 0, "learning_rate": self.learning_rate > 0,
                  "epsilon": 0 < self.epsilon < 1, "beta": self.beta >= 0,
                  "updates_per_batch": self.updates_per_batch >= 1,
                  "eval_every": self.eval_every >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"grpo config: field '{name}' = {getattr(self, name)!r} is out of "
                                  f"range (group_size >= 2 so advantages have a spread; "
                                  f"temperature > 0 since GRPO samples)")


def load_config(path: str | Path) -> GRPOConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: malformed TOML ({error})") from None
    # Relative paths are relative to the working directory, as in `familial train` configs.
    return from_dict(GRPOConfig, data, str(path))


# Sampling.

@dataclass
class Rollout:
    sequences: torch.Tensor  # (B, P + C) left-padded prompts then completions
    attention_mask: torch.Tensor  # (B, P + C) 1 for real tokens
    completion_mask: torch.Tensor  # (B, C) 1 for completion tokens up to and including a stop
    prompt_width: int

    @property
    def completions(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width:]


@torch.no_grad()
def generate(member: FamilyMember, prompts: list[list[int]], max_new_tokens: int,
             temperature: float, stop_ids: set[int], pad_id: int,
             generator: torch.Generator | None = None) -> Rollout:
    """Sample completions for a batch of prompts (temperature 0: greedy) with a KV cache."""
    device = member.model.embed_tokens.weight.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache()
    logits = member(ids, attention_mask=mask, position_ids=positions, cache=cache)[:, -1]
    next_position = positions[:, -1:] + 1
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, active = [], []
    for step in range(max_new_tokens):
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        active.append(~done)
        done = done | torch.isin(token, stops)
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat((mask, active[-1][:, None].long()), dim=1)
        logits = member(token[:, None], attention_mask=mask, position_ids=next_position,
                        cache=cache)[:, -1]
        next_position = next_position + 1
    completion = torch.stack(tokens, dim=1)
    completion_mask = torch.stack(active, dim=1).long()
    return Rollout(torch.cat((ids, completion), dim=1),
                   torch.cat((mask[:, :width], completion_mask), dim=1), completion_mask, width)


def completion_logprobs(member: FamilyMember, rollout: Rollout, temperature: float) -> torch.Tensor:
    """(B, C) log-probabilities of the completion tokens under `member` (with grad)."""
    positions = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = member(rollout.sequences, attention_mask=rollout.attention_mask, position_ids=positions)
    # Position t predicts token t + 1: the completion is predicted from P - 1 .. end - 1.
    logits = logits[:, rollout.prompt_width - 1:-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, rollout.completions[..., None]).squeeze(-1)


# The objective.

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards in consecutive groups -> (r - group mean) / (group std + eps)."""
    grouped = rewards.view(-1, group_size)
    mean, std = grouped.mean(-1, keepdim=True), grouped.std(-1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.2,
              beta: float = 0.04) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio objective with k3 KL, averaged over all active tokens of the batch."""
    mask = mask.float()
    tokens = mask.sum().clamp(min=1)
    ratio = torch.exp(logp - old_logp)
    advantage = advantages[:, None]
    objective = torch.minimum(ratio * advantage, ratio.clamp(1 - epsilon, 1 + epsilon) * advantage)
    per_token = -objective
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    loss = (per_token * mask).sum() / tokens
    clipped = ((ratio < 1 - epsilon) & (advantage < 0)) | ((ratio > 1 + epsilon) & (advantage > 0))
    stats = {"kl": float((kl.detach() * mask).sum() / tokens),
             "clip_fraction": float((clipped.float() * mask).sum() / tokens)}
    return loss, stats


# Training.

def default_trainable(config: FamilyConfig, exit_layer: int) -> list[str]:
    if str(exit_layer) in config.runtime.get("expansion", {}):
        return trainable_parameter_patterns(config, exit_layer)
    if exit_layer == config.exits[-1]:
        return ["*"]
    return [f"branches.{exit_layer}.*"]


class GRPOTrainer:
    """The policy member, its frozen reference copy, the optimiser and one `step()`."""

    def __init__(self, model: FamilyModel, tokenizer: Tokenizer, reward: Reward,
                 problems: list[Problem], config: GRPOConfig) -> None:
        if not problems:
            raise ConfigError("grpo: no training problems")
        self.model, self.tokenizer, self.reward, self.config = model, tokenizer, reward, config
        self.problems = problems
        self.exit = model.config.resolve_member(config.member)
        self.policy = model.member(self.exit)
        freeze_except(model, config.trainable or default_trainable(model.config, self.exit))
        parameters = [p for p in self.policy.parameters() if p.requires_grad]
        if not parameters:
            raise ConfigError(f"grpo: trainable patterns {config.trainable} select no parameter "
                              f"of member {self.exit}")
        self.reference = None
        if config.beta > 0:
            self.reference = copy.deepcopy(self.policy).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate,
                                           weight_decay=config.weight_decay, betas=(0.9, 0.99))
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator(device=self.policy.model.embed_tokens.weight.device)
        self.generator.manual_seed(config.seed)
        self.stop_ids = set(_as_list(model.config.eos_token_id))
        for token in config.stop_tokens:
            found = tokenizer.token_to_id(token)
            if found is None:
                raise ConfigError(f"grpo config: stop token {token!r} is not in the tokenizer")
            self.stop_ids.add(found)
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.steps_done = 0

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ConfigError(f"grpo: prompt {text!r} encodes to no tokens")
        return ids

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> str:
        kept = [int(t) for t, m in zip(ids, mask) if m and int(t) not in self.stop_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def step(self) -> dict[str, float]:
        config = self.config
        batch = [self.rng.choice(self.problems) for _ in range(config.prompts_per_step)]
        prompts = [self.encode(prompt) for prompt, _ in batch for _ in range(config.group_size)]
        answers = [(prompt, answer) for prompt, answer in batch for _ in range(config.group_size)]
        rollout = generate(self.policy, prompts, config.max_new_tokens, config.temperature,
                           self.stop_ids, self.pad_id, self.generator)
        texts = [self.decode(row, mask)
                 for row, mask in zip(rollout.completions, rollout.completion_mask)]
        rewards = torch.tensor([float(self.reward(p, text, a)) for (p, a), text in zip(answers, texts)])
        advantages = group_advantages(rewards, config.group_size).to(rollout.sequences.device)
        ref_logp = old_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = completion_logprobs(self.reference, rollout, config.temperature)
        totals = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
        for _ in range(config.updates_per_batch):
            logp = completion_logprobs(self.policy, rollout, config.temperature)
            if old_logp is None:
                old_logp = logp.detach()
            loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, rollout.completion_mask,
                                    config.epsilon, config.beta)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"],
                                                  config.max_grad_norm)
            self.optimizer.step()
            for key, value in dict(stats, loss=float(loss.detach()), grad_norm=float(norm)).items():
                totals[key] += value / config.updates_per_batch
        self.steps_done += 1
        return dict(step=self.steps_done, reward=float(rewards.mean()),
                    reward_std=float(rewards.std()),
                    completion_tokens=float(rollout.completion_mask.sum(-1).float().mean()),
                    **totals)

    @torch.no_grad()
    def accuracy(self, problems: list[Problem], batch_size: int = 64) -> float:
        """Mean reward of greedy completions (exact-answer accuracy for the arithmetic reward)."""
        if not problems:
            return float("nan")
        scores = []
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            rollout = generate(self.policy, [self.encode(p) for p, _ in chunk],
                               self.config.max_new_tokens, 0.0, self.stop_ids, self.pad_id)
            for (prompt, answer), row, mask in zip(chunk, rollout.completions, rollout.completion_mask):
                scores.append(float(self.reward(prompt, self.decode(row, mask), answer)))
        return sum(scores) / len(scores)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def load_problems(task: TaskConfig) -> list[Problem]:
    if task.kind == "sums":
        return sum_problems(task.max_operand, task.template)
    if task.kind != "jsonl":
        raise ConfigError(f"grpo config: task.kind = {task.kind!r}: expected 'sums' or 'jsonl'")
    if task.path is None:
        raise ConfigError("grpo config: task.kind = 'jsonl' needs task.path")
    problems = []
    path = Path(task.path)
    if not path.is_file():
        raise ConfigError(f"grpo config: task.path = {path}: not found")
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            problems.append((str(item["prompt"]), str(item["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number}: expected a JSON object with 'prompt' and "
                              f"'answer'") from None
    return problems


def train(config: GRPOConfig, log=print) -> dict:
    """Run GRPO from a config: log JSONL to output/grpo.jsonl, save output/family."""
    from familial.checkpoint_io import load_family, save_family

    output = Path(config.output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"grpo config: output = {output} already exists and is not empty")
    tokenizer_path = Path(config.tokenizer or Path(config.family) / "tokenizer.json")
    if not tokenizer_path.is_file():
        raise ConfigError(f"grpo config: tokenizer {tokenizer_path} not found (set 'tokenizer')")
    model = load_family(config.family)
    torch.manual_seed(config.seed)
    train_problems, held_out = split_problems(load_problems(config.task), config.task.held_out,
                                              config.seed)
    trainer = GRPOTrainer(model, Tokenizer.from_file(str(tokenizer_path)),
                          load_reward(config.reward), train_problems, config)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    first = {"held_out_accuracy": trainer.accuracy(held_out),
             "train_accuracy": trainer.accuracy(train_problems)}
    log(f"grpo: member {trainer.exit}, {len(train_problems)} train / {len(held_out)} held-out "
        f"problems, accuracy before {first['held_out_accuracy']:.3f}")
    with open(output / "grpo.jsonl", "w") as handle:
        for step in range(1, config.steps + 1):
            record = trainer.step()
            if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                record["held_out_accuracy"] = trainer.accuracy(held_out)
            record["elapsed_s"] = round(time.perf_counter() - start, 2)
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            if step % max(1, config.steps // 10) == 0 or step == config.steps:
                log(f"step {step}: reward {record['reward']:.3f} kl {record['kl']:.4f} "
                    f"clip {record['clip_fraction']:.3f}")
    summary = {"member": trainer.exit, "before": first,
               "after": {"held_out_accuracy": trainer.accuracy(held_out),
                         "train_accuracy": trainer.accuracy(train_problems)},
               "config": asdict(config)}
    save_family(model, output / "family", tokenizer_source=config.family)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"grpo: held-out accuracy {first['held_out_accuracy']:.3f} -> "
        f"{summary['after']['held_out_accuracy']:.3f}; wrote {output / 'family'}")
    return summary
