"""Training the exits of a frozen trunk from an exit cache: only branches (and their norms and
heads where trainable) learn, and the trunk never runs, forward or backward.

Each exit's loss per target token is

    kl_weight * KL_topk(teacher || member) + ce_weight * CE(member, target)

where KL_topk is the exact KL divergence between the two distributions coarsened to k + 1
outcomes: the teacher's k most likely tokens, and "any other token" (the tail). The teacher's
probabilities are its own (not renormalised over the k), so a flat teacher keeps a heavy tail
and the member is taught how much mass to leave outside the k, not only how to rank them.
The member's tail probability comes from its full softmax, so the gradient reaches every
logit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from familial import checks
from familial.config import ConfigError
from familial.model import FamilyModel
from familial.train.exit_cache import ExitCache, head_chunk_rows

# Lowest log-probability the member's tail mass counts with in the KL (e^-69 ~ 1e-30).
TAIL_FLOOR = -69.0


@dataclass
class BranchTrainConfig:
    # exits to train (default: every exit the cache holds).
    exits: list[int] | None = None
    epochs: float = 1.0
    # cached rows per optimizer step.
    batch_size: int = 4
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.5
    # train each branch's own LM head; a head that is the trunk's (tied to the embedding, or
    # shared by every exit) stays frozen whatever this says.
    train_head: bool = False
    # train each branch's final norm.
    train_norm: bool = True
    # the LM head's matmul in training: bf16 runs it ~2.5x faster on CPUs with AVX-512 BF16
    # or AMX, and the head is most of a branch's cost at a large vocabulary (the softmax, the
    # losses and held-out figures stay float32).
    head_precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0

    def validate(self, where: str = "exits train") -> None:
        def name(key: str) -> str:
            return checks.field(where, key)

        checks.positive_number(name("epochs"), self.epochs, error=ConfigError)
        checks.positive_int(name("batch_size"), self.batch_size, error=ConfigError)
        checks.finite_number(name("min_lr"), self.min_lr, f"between 0 and lr ({self.lr})", minimum=0,
                             maximum=self.lr, error=ConfigError)
        checks.non_negative_int(name("warmup_steps"), self.warmup_steps, error=ConfigError)
        for key in ("kl_weight", "ce_weight"):
            checks.finite_number(name(key), getattr(self, key), "a number >= 0", minimum=0, error=ConfigError)
        checks.require(self.kl_weight + self.ce_weight > 0, name("ce_weight"), self.ce_weight,
                       f"kl_weight ({self.kl_weight}) and ce_weight must not both be 0", error=ConfigError)


def topk_kl(log_q: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row KL(teacher || member) over the teacher's top-k and the tail, from the member's
    full log-softmax `log_q` (M, V) and the teacher's (M, k) ids and log-probabilities."""
    log_q_top = log_q.gather(-1, top_ids)
    p_top = top_logprobs.exp()
    p_tail = (1 - p_top.sum(-1)).clamp_min(0)
    # log of the member's mass outside the k, without the cancellation of log(1 - sum q_top).
    # Floored at TAIL_FLOOR: an empty tail (k = vocabulary) leaves the teacher's rounding error
    # (~1e-16) as p_tail, which must meet a finite log, not -inf or the dtype's lowest value.
    masked = log_q.scatter(-1, top_ids, float("-inf"))
    log_q_tail = torch.logsumexp(masked, dim=-1).clamp_min(TAIL_FLOOR)
    kl_top = (p_top * (top_logprobs - log_q_top)).sum(-1)
    return kl_top + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail


def exit_losses(hidden: torch.Tensor, head: nn.Module, batch: dict[str, torch.Tensor], bf16: bool = False
                ) -> dict[str, torch.Tensor]:
    """Per-token (M,) losses of normed hidden states (M, H): ce, kl, agree (with the teacher's
    top-1), differentiable through `hidden` and `head` (its matmul in bf16 with `bf16`)."""
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = head(hidden)
    log_q = torch.log_softmax(logits.float(), dim=-1)
    ce = -log_q.gather(-1, batch["targets"][:, None])[:, 0]
    kl = topk_kl(log_q, batch["top_ids"], batch["top_logprobs"])
    agree = (log_q.argmax(-1) == batch["top_ids"][:, 0]).float()
    return {"ce": ce, "kl": kl, "agree": agree}


def _flat(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.flatten(0, 1) for name, value in batch.items() if name != "hidden"}


def exit_pass(model: FamilyModel, exit_layer: int, batch: dict[str, torch.Tensor], kl_weight: float,
              ce_weight: float, backward: bool, bf16_head: bool = False) -> dict[str, float]:
    """Sums over the batch's tokens of ce, kl, agree and the objective for one exit's branch on
    cached states; with `backward`, the objective's gradient (divided by the token count) lands
    on the branch.

    The head runs chunk by chunk on a detached copy of the branch output, whose gradient is
    gathered and sent through the branch once, so no (tokens, vocab) tensor outlives its chunk.
    """
    rows, length = batch["targets"].shape
    rotary = model.rotary(torch.arange(length).expand(rows, length), torch.float32)
    with torch.set_grad_enabled(backward):
        normed = model.exit_norm(exit_layer)(model.run_branch(exit_layer, batch["hidden"], rotary)).flatten(0, 1)
    flat = _flat(batch)
    detached = normed.detach().requires_grad_(backward)
    head = model.exit_head(exit_layer)
    totals = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "loss": 0.0}
    count = normed.shape[0]
    chunk = head_chunk_rows(model.config.vocab_size)
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        with torch.set_grad_enabled(backward):
            losses = exit_losses(detached[part], head, {k: v[part] for k, v in flat.items()}, bf16_head)
            objective = (kl_weight * losses["kl"] + ce_weight * losses["ce"]).sum()
            if backward:
                (objective / count).backward()
        for name in ("ce", "kl", "agree"):
            totals[name] += float(losses[name].detach().sum())
        totals["loss"] += float(objective.detach())
    if backward:
        normed.backward(detached.grad)
    return totals


class BranchTrainer:
    """Optimises the branches of `exits` on an exit cache; the trunk is never touched."""

    def __init__(self, model: FamilyModel, config: BranchTrainConfig, exits: list[int]) -> None:
        self.model, self.config, self.exits = model, config, exits
        trunk = {id(p) for name, p in model.named_parameters() if not name.startswith("branches.")}
        self.parameters: dict[str, nn.Parameter] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        for e in exits:
            branch = model.branches[str(e)]
            for name, p in branch.named_parameters():
                part = name.split(".")[0]
                wanted = part == "layers" or (part == "norm" and config.train_norm) or (
                    part == "lm_head" and config.train_head)
                if wanted and id(p) not in trunk:
                    p.requires_grad_(True)
                    self.parameters[f"branches.{e}.{name}"] = p
        if not self.parameters:
            raise ConfigError(f"exits {exits}: nothing to train (no branch parameters)")
        self.optimizer = torch.optim.AdamW(list(self.parameters.values()), lr=config.lr,
                                           weight_decay=config.weight_decay, betas=(0.9, 0.95))

    def step(self, batches: dict[int, dict[str, torch.Tensor]], lr: float) -> dict[int, dict[str, float]]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        stats = {e: exit_pass(self.model, e, batches[e], self.config.kl_weight, self.config.ce_weight,
                              backward=True, bf16_head=self.config.head_precision == "bf16") for e in self.exits}
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(list(self.parameters.values()), self.config.grad_clip)
        self.optimizer.step()
        return stats


def lr_at(config: BranchTrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine from lr to min_lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = min(max((step - config.warmup_steps) / max(total - 1 - config.warmup_steps, 1), 0.0), 1.0)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate_exits(model: FamilyModel, cache: ExitCache, exits: list[int], batch_size: int = 4,
                   max_rows: int | None = None, truncated: bool = True) -> dict:
    """Held-out figures per exit from a cache: the member's loss (nats/target), its KL to the full
    member's top-k, its greedy agreement with the full member, and with `truncated` the truncated
    loss (the state entering the exit through the final norm and head, no branch: it does not
    depend on the branch, so once is enough); plus the full member's loss."""
    rows = cache.rows if max_rows is None else min(cache.rows, max_rows)
    sums = {e: {"ce": 0.0, "kl": 0.0, "agree": 0.0, "truncated": 0.0} for e in exits}
    full, count = 0.0, 0
    for start in range(0, rows, batch_size):
        index = np.arange(start, min(start + batch_size, rows))
        for e in exits:
            batch = cache.batch(index, e)
            stats = exit_pass(model, e, batch, 1.0, 0.0, backward=False)
            for name in ("ce", "kl", "agree"):
                sums[e][name] += stats[name]
            if truncated:
                logits = model.lm_head(model.model.norm(batch["hidden"])).float()
                sums[e]["truncated"] += float(F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                              reduction="sum"))
        full += float(batch["teacher_nll"].sum())
        count += batch["teacher_nll"].numel()
    figures = {str(e): {"loss": s["ce"] / count, "kl_topk": s["kl"] / count, "agreement": s["agree"] / count}
               for e, s in sums.items()}
    if truncated:
        for e, s in sums.items():
            figures[str(e)]["truncated_loss"] = s["truncated"] / count
    return {"tokens": count, "full_loss": full / count, "exits": figures}


def train_branches(model: FamilyModel, cache: ExitCache, config: BranchTrainConfig, log=print) -> dict:
    """Train the branches of `config.exits` (default: the cache's) for `config.epochs` passes over
    the cache, rows shuffled per epoch. Returns a summary (steps, tokens, speed, last losses)."""
    config.validate()
    exits = list(config.exits or cache.spec.exits)
    cache.check_family(model, exits)
    trainer = BranchTrainer(model, config, exits)
    model.train()
    per_epoch = math.ceil(cache.rows / config.batch_size)
    total = max(1, math.ceil(config.epochs * per_epoch))
    rng = np.random.default_rng(config.seed)
    order: np.ndarray = np.empty(0, dtype=np.int64)
    began = time.perf_counter()
    stats: dict[int, dict[str, float]] = {}
    tokens = 0
    for step in range(total):
        if len(order) < config.batch_size:
            order = np.concatenate([order, rng.permutation(cache.rows)])
        index, order = np.sort(order[:config.batch_size]), order[config.batch_size:]
        batches = {e: cache.batch(index, e) for e in exits}
        stats = trainer.step(batches, lr_at(config, step, total))
        count = len(index) * cache.spec.seq_len
        tokens += count
        if log is not None and (step % 10 == 0 or step == total - 1):
            elapsed = time.perf_counter() - began
            parts = " ".join(f"{e}: ce {s['ce'] / count:.3f} kl {s['kl'] / count:.3f}" for e, s in stats.items())
            log(f"step {step + 1}/{total} {parts} ({tokens / elapsed:.0f} tokens/s)")
    model.eval()
    elapsed = time.perf_counter() - began
    return {"steps": total, "tokens": tokens, "seconds": round(elapsed, 1),
            "tokens_per_second": round(tokens / elapsed, 1), "exits": exits,
            "parameters": sum(p.numel() for p in trainer.parameters.values())}
