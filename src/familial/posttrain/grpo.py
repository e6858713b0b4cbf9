"""GRPO (group relative policy optimisation) of one member against verifiable rewards.

Each step samples `prompts_per_step` problems, draws `group_size` completions for each from
the policy member (familial.posttrain.rollout: the serving engine over the policy's own
weights), scores them with the configured rewards and trains on

    A_i    = (r_i - mean(r_group)) / (std(r_group) + 1e-4)       (unbiased std, as TRL)
    ratio  = exp(logp - logp_old)
    obj    = min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon) A)
    kl     = exp(ref - logp) - (ref - logp) - 1                  (k3 estimator)
    loss   = sum over active completion tokens of (beta kl - obj) / number of active tokens

The normalisation is token-level over the whole batch (TRL/DAPO's "token" loss type): long
and short completions weigh the same per token. `beta` defaults to 0.04 (TRL's historical
default); 0 skips the reference. Log-probabilities use logits / temperature, the
distribution the completions were sampled from, and are formed chunk by chunk through the
head (familial.posttrain.logprobs): the KL term needs only the sampled tokens' log-probs, so
no (tokens, vocab) tensor exists. With `updates_per_batch` = 1 the ratio is exactly 1 and
the clip never fires; more updates per batch reuse the samples off-policy.

The reference is the policy member at the start. Only parameters matching `trainable`
change, so the reference keeps a copy of those alone; the frozen ones are the policy's own.

Under torchrun every process holds the member (data parallel): each rolls out its share of
the step's prompts (whole groups, so advantages stay local), the loss is normalised by the
token count of all ranks and gradients are summed across them, so N processes train exactly
as one does on the same prompts and seeds (each completion draws with its own seed).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from familial import checks
from familial.config import ConfigError, FamilyConfig, from_dict
from familial.model import FamilyModel, embed_inputs
from familial.posttrain.expand import freeze_except, trainable_parameter_patterns
from familial.posttrain.logprobs import DEFAULT_CHUNK, token_logprobs
from familial.posttrain.rewards import Reward, Rewards, RewardSpec, split_problems, sum_problems
from familial.posttrain.rollout import RolloutEngine, SequenceBatch
from familial.train.config import read_toml
from familial.train.layout import compute_dtype, resolve_device

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

    def __post_init__(self) -> None:
        def name(key: str) -> str:
            return checks.field("grpo config", f"task.{key}")

        checks.one_of(name("kind"), self.kind, ("sums", "jsonl"), "'sums' or 'jsonl'", error=ConfigError)
        checks.require(self.kind != "jsonl" or self.path is not None, name("path"), self.path,
                       "task.kind = 'jsonl' needs task.path", error=ConfigError)
        checks.non_negative_int(name("max_operand"), self.max_operand, error=ConfigError)
        checks.in_range(name("held_out"), self.held_out, 0, 1, open_high=True, error=ConfigError)


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
    # a reward name or path (familial.posttrain.rewards), or a weighted list of [[reward]] tables.
    reward: str | list[RewardSpec] = "arithmetic"
    # glob patterns of trainable parameters; empty: an expanded member's new blocks, norm and
    # head, else the member's own branch (other members untouched), or everything for the
    # final member (its layers are the trunk every member shares).
    trainable: list[str] = field(default_factory=list)
    steps: int = 200
    # problems per step over all processes (a multiple of the process count).
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
    # "auto": this process's GPU when there is one, else the CPU (as in training).
    device: str = "auto"
    # the update's matmul dtype over float32 master weights: auto = bf16 on CUDA, fp32 elsewhere.
    precision: str = "auto"
    # completion tokens per chunk through the head (log-probs are never (tokens, vocab) at once).
    chunk_size: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        count, number = checks.is_integer, checks.is_number
        rules = {
            "steps": (count(self.steps) and self.steps >= 1, "an integer >= 1"),
            "prompts_per_step": (count(self.prompts_per_step) and self.prompts_per_step >= 1, "an integer >= 1"),
            "group_size": (count(self.group_size) and self.group_size >= 2,
                           "an integer >= 2, so that advantages have a spread"),
            "max_new_tokens": (count(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            "temperature": (number(self.temperature) and self.temperature > 0, "a number > 0, since GRPO samples"),
            "learning_rate": (number(self.learning_rate) and self.learning_rate > 0, "a number > 0"),
            "epsilon": (number(self.epsilon) and 0 < self.epsilon < 1, "a number in (0, 1)"),
            "beta": (number(self.beta) and self.beta >= 0, "a number >= 0"),
            "updates_per_batch": (count(self.updates_per_batch) and self.updates_per_batch >= 1, "an integer >= 1"),
            "eval_every": (count(self.eval_every) and self.eval_every >= 0, "an integer >= 0"),
            "chunk_size": (count(self.chunk_size) and self.chunk_size >= 1, "an integer >= 1"),
            "precision": (self.precision in ("auto", "bf16", "fp32"), "auto, bf16 or fp32")}
        for name, (ok, expected) in rules.items():
            if not ok:
                raise ConfigError(f"grpo config: field '{name}' = {getattr(self, name)!r} is out of range: "
                                  f"expected {expected}")


def load_config(path: str | Path) -> GRPOConfig:
    data = read_toml(path, "a TOML GRPO config")
    # Relative paths are relative to the working directory, as in `familial train` configs.
    return from_dict(GRPOConfig, data, str(path))


# The objective.

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards in consecutive groups -> (r - group mean) / (group std + eps)."""
    grouped = rewards.view(-1, group_size)
    mean, std = grouped.mean(-1, keepdim=True), grouped.std(-1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.2,
              beta: float = 0.04, tokens: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio objective with k3 KL, averaged over all active tokens of the batch.

    `tokens`: the number to divide by (default: this batch's active tokens); data-parallel
    ranks pass the count over every rank, so their losses and statistics add up to the mean.
    """
    mask = mask.float()
    tokens = mask.sum().clamp(min=1) if tokens is None else max(tokens, 1)
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


class DataParallel:
    """This process's place among torchrun's processes (one process: rank 0 of 1)."""

    def __init__(self) -> None:
        self.size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def share(self, items: list) -> list:
        """This rank's consecutive share of `items` (their count a multiple of the size)."""
        count = len(items) // self.size
        return items[self.rank * count:(self.rank + 1) * count]

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, values: list[float]) -> list[float]:
        """Every rank's values, in rank order."""
        if self.size == 1:
            return values
        parts = [None] * self.size
        dist.all_gather_object(parts, values)
        return [v for part in parts for v in part]

    def reduce_gradients(self, parameters: list[torch.Tensor]) -> None:
        """Sum gradients over the ranks in one collective (the loss is already divided by the
        global token count)."""
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(parameters, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()


class GRPOTrainer:
    """The policy member, the reference's trainable weights, the optimiser and one `step()`."""

    def __init__(self, model: FamilyModel, tokenizer: Tokenizer, reward: Reward | str | list[RewardSpec],
                 problems: list[Problem], config: GRPOConfig, parallel: DataParallel | None = None) -> None:
        if not problems:
            raise ConfigError("grpo: no training problems")
        self.parallel = parallel or DataParallel()
        if config.prompts_per_step % self.parallel.size:
            raise ConfigError(f"grpo config: prompts_per_step = {config.prompts_per_step} is not a multiple "
                              f"of the {self.parallel.size} processes")
        self.device = resolve_device(config.device)
        dtype = compute_dtype(config.precision, self.device)
        self.autocast = None if dtype == torch.float32 else dtype
        self.model = model.to(self.device)
        self.tokenizer, self.config = tokenizer, config
        self.rewards = reward if isinstance(reward, Rewards) else Rewards(reward)
        self.problems = problems
        self.exit = model.config.resolve_member(config.member)
        self.policy = model.member(self.exit)
        freeze_except(model, config.trainable or default_trainable(model.config, self.exit))
        self.parameters = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.parameters:
            raise ConfigError(f"grpo: trainable patterns {config.trainable} select no parameter "
                              f"of member {self.exit}")
        trains = [any(p.requires_grad for p in layer.parameters()) for layer in self.policy.model.layers]
        self.first_trainable = -1 if self.policy.model.embed_tokens.weight.requires_grad else (
            trains.index(True) if True in trains else len(trains))
        # The reference differs from the policy only where it trains: keep those initial values.
        self.reference = [p.detach().clone() for p in self.parameters] if config.beta > 0 else None
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate,
                                           weight_decay=config.weight_decay, betas=(0.9, 0.99))
        self.rng = random.Random(config.seed)
        self.stop_ids = set(_as_list(model.config.eos_token_id))
        for token in config.stop_tokens:
            found = tokenizer.token_to_id(token)
            if found is None:
                raise ConfigError(f"grpo config: stop token {token!r} is not in the tokenizer")
            self.stop_ids.add(found)
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.slots = config.prompts_per_step // self.parallel.size * config.group_size
        self.rollouts: RolloutEngine | None = None
        self.steps_done = 0

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ConfigError(f"grpo: prompt {text!r} encodes to no tokens")
        return ids

    def decode(self, ids: list[int]) -> str:
        kept = [t for t in ids if t not in self.stop_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def _engine(self, prompts: list[list[int]]) -> RolloutEngine:
        """The rollout engine, sized for the longest prompt so far (its KV cache is allocated
        once and reused every step)."""
        longest = max(len(p) for p in prompts) + self.config.max_new_tokens + 1
        if self.rollouts is None or self.rollouts.engine.max_seq_len < longest:
            self.rollouts = RolloutEngine(self.model, self.exit, self.slots, longest, self.stop_ids, self.device)
        return self.rollouts

    def _seed(self, index: int) -> int:
        """Completion `index` of this step (over every rank) draws with this seed."""
        return (self.config.seed << 40) + (self.steps_done << 20) + index

    def step(self) -> dict[str, float]:
        config, parallel = self.config, self.parallel
        started = time.perf_counter()
        batch = [self.rng.choice(self.problems) for _ in range(config.prompts_per_step)]
        mine = parallel.share(list(enumerate(batch)))
        problems = [problem for _, problem in mine for _ in range(config.group_size)]
        seeds = [self._seed(j * config.group_size + g) for j, _ in mine for g in range(config.group_size)]
        prompts = [self.encode(prompt) for prompt, _ in problems]
        rollout = self._engine(prompts).sample(prompts, config.max_new_tokens, config.temperature, seeds)
        texts = [self.decode(c) for c in rollout.completions]
        totals, parts = self.rewards.scores([p for p, _ in problems], texts, [a for _, a in problems])
        advantages = group_advantages(torch.tensor(totals), config.group_size).to(self.device)
        sequences = SequenceBatch.of(rollout, self.pad_id, self.device)
        lengths = [len(c) for c in rollout.completions]
        tokens = parallel.sum([float(sum(lengths))], self.device)[0]
        rolled = time.perf_counter()
        stats = self._update(sequences, advantages, tokens)
        updated = time.perf_counter()
        self.steps_done += 1
        rewards = torch.tensor(parallel.gather(totals))
        record = dict(step=self.steps_done, reward=float(rewards.mean()), reward_std=float(rewards.std()))
        if len(parts) > 1:
            record.update({f"reward/{name}": _mean(parallel.gather(values)) for name, values in parts.items()})
        lengths = parallel.gather([float(n) for n in lengths])
        record.update(stats, completion_tokens=_mean(lengths), completion_tokens_max=max(lengths),
                      rollout_s=round(rolled - started, 4), update_s=round(updated - rolled, 4))
        return record

    def _update(self, sequences: SequenceBatch, advantages: torch.Tensor, tokens: float) -> dict[str, float]:
        config = self.config
        ref_logp = old_logp = None
        frozen = self.frozen_prefix(sequences)
        if self.reference is not None:
            ref_logp = self.reference_logprobs(sequences, frozen)
        totals = dict.fromkeys(("loss", "kl", "clip_fraction", "grad_norm"), 0.0)
        for _ in range(config.updates_per_batch):
            logp = self.logprobs(sequences, frozen)
            if old_logp is None:
                old_logp = logp.detach()
            loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, sequences.mask, config.epsilon,
                                    config.beta, tokens)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.parallel.reduce_gradients(self.parameters)
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)
            self.optimizer.step()
            # Each rank's loss and statistics are its share of the global mean.
            shares = self.parallel.sum([float(loss.detach()), stats["kl"], stats["clip_fraction"]], self.device)
            for key, value in zip(("loss", "kl", "clip_fraction", "grad_norm"), (*shares, float(norm))):
                totals[key] += value / config.updates_per_batch
        return totals

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @torch.no_grad()
    def frozen_prefix(self, sequences: SequenceBatch) -> tuple[torch.Tensor, tuple] | None:
        """The member's layers before its first trainable one, run once per batch: policy and
        reference share them (frozen), and every update starts from their output. None when
        the embedding trains."""
        if self.first_trainable < 0:
            return None
        with self._autocast():
            hidden, rotary = self._embed(sequences)
            for layer in self.policy.model.layers[:self.first_trainable]:
                hidden = layer(hidden, rotary)
        return hidden, rotary

    def _embed(self, sequences: SequenceBatch) -> tuple[torch.Tensor, tuple]:
        # Rows start at position 0: the default positions are theirs.
        hidden, rotary, _ = embed_inputs(self.policy.model.embed_tokens, self.model.model.rotary_emb,
                                         sequences.input_ids, None, None)
        return hidden, rotary

    def logprobs(self, sequences: SequenceBatch, frozen: tuple[torch.Tensor, tuple] | None) -> torch.Tensor:
        """(B, C) log-probabilities of the completion tokens under the policy (with grad), from
        the frozen prefix's output."""
        model = self.policy.model
        with self._autocast():
            if frozen is None:
                (hidden, rotary), layers = self._embed(sequences), model.layers
            else:
                (hidden, rotary), layers = frozen, model.layers[self.first_trainable:]
            # Right-padded rows from position 0: the plain causal mask is exact (no 4-D mask).
            for layer in layers:
                hidden = layer(hidden, rotary)                              # (B, W, H)
            hidden = model.norm(hidden)
        rows = hidden[sequences.rows, sequences.columns]                   # (M, H)
        if self.autocast:
            rows = rows.to(self.autocast)
        logp = token_logprobs(rows, self.policy.lm_head, sequences.targets, self.config.temperature,
                              self.config.chunk_size)
        return sequences.grid(logp)

    @torch.no_grad()
    def reference_logprobs(self, sequences: SequenceBatch, frozen: tuple[torch.Tensor, tuple] | None) -> torch.Tensor:
        """(B, C) log-probabilities under the reference: the policy at the start."""
        with self._reference_weights():
            return self.logprobs(sequences, frozen)

    @contextlib.contextmanager
    def _reference_weights(self):
        """The trainable parameters hold their initial values inside the block (no copies:
        the tensors are swapped, and swapped back)."""
        current = [p.data for p in self.parameters]
        try:
            for p, initial in zip(self.parameters, self.reference):
                p.data = initial
            yield
        finally:
            for p, data in zip(self.parameters, current):
                p.data = data

    @torch.no_grad()
    def accuracy(self, problems: list[Problem]) -> float:
        """Mean reward of greedy completions (exact-answer accuracy for the arithmetic reward),
        the problems split over the ranks."""
        if not problems:
            return float("nan")
        mine = problems[self.parallel.rank::self.parallel.size]
        total = 0.0
        if mine:
            prompts = [self.encode(p) for p, _ in mine]
            rollout = self._engine(prompts).greedy(prompts, self.config.max_new_tokens)
            texts = [self.decode(c) for c in rollout.completions]
            scores, _ = self.rewards.scores([p for p, _ in mine], texts, [a for _, a in mine])
            total = sum(scores)
        return self.parallel.sum([total], self.device)[0] / len(problems)


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def load_problems(task: TaskConfig) -> list[Problem]:
    if task.kind == "sums":
        return sum_problems(task.max_operand, task.template)
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
    """Run GRPO from a config: log JSONL to output/grpo.jsonl, save output/family. Under
    torchrun, every process trains (data parallel) and the first one writes."""
    from familial.checkpoint_io import load_family, save_family

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from familial.parallel.mesh import init_distributed

        init_distributed()
    try:
        return _train(config, log, load_family, save_family)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: GRPOConfig, log, load_family, save_family) -> dict:
    parallel = DataParallel()
    main = parallel.rank == 0
    output = Path(config.output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"grpo config: output = {output} already exists and is not empty")
    tokenizer_path = Path(config.tokenizer or Path(config.family) / "tokenizer.json")
    if not tokenizer_path.is_file():
        raise ConfigError(f"grpo config: tokenizer {tokenizer_path} not found (set 'tokenizer')")
    model = load_family(config.family, device=resolve_device(config.device))
    torch.manual_seed(config.seed)
    train_problems, held_out = split_problems(load_problems(config.task), config.task.held_out,
                                              config.seed)
    trainer = GRPOTrainer(model, Tokenizer.from_file(str(tokenizer_path)), config.reward, train_problems,
                          config, parallel)
    if parallel.size > 1:
        dist.barrier()   # every rank has seen the output directory empty
    if main:
        output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    first = {"held_out_accuracy": trainer.accuracy(held_out),
             "train_accuracy": trainer.accuracy(train_problems)}
    log = log if main else (lambda *_: None)
    log(f"grpo: member {trainer.exit} on {parallel.size} x {trainer.device.type}, {len(train_problems)} "
        f"train / {len(held_out)} held-out problems, accuracy before {first['held_out_accuracy']:.3f}")
    with open(output / "grpo.jsonl", "w") if main else contextlib.nullcontext() as handle:
        for step in range(1, config.steps + 1):
            record = trainer.step()
            if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                record["held_out_accuracy"] = trainer.accuracy(held_out)
            record["elapsed_s"] = round(time.perf_counter() - start, 2)
            if main:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
            if step % max(1, config.steps // 10) == 0 or step == config.steps:
                log(f"step {step}: reward {record['reward']:.3f} kl {record['kl']:.4f} "
                    f"clip {record['clip_fraction']:.3f} completion {record['completion_tokens']:.1f} tokens "
                    f"rollout {record['rollout_s']:.3f}s update {record['update_s']:.3f}s")
    summary = {"member": trainer.exit, "processes": parallel.size, "before": first,
               "after": {"held_out_accuracy": trainer.accuracy(held_out),
                         "train_accuracy": trainer.accuracy(train_problems)},
               "config": asdict(config)}
    if main:
        save_family(model, output / "family", tokenizer_source=config.family)
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"grpo: held-out accuracy {first['held_out_accuracy']:.3f} -> "
        f"{summary['after']['held_out_accuracy']:.3f}; wrote {output / 'family'}")
    if parallel.size > 1:
        dist.barrier()
    return summary
