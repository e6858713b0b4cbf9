"""The single-process trainer, built from reusable pieces a parallel runner can share.

build_model -> freeze -> build_optimizer -> train_step (per optimizer step) -> save_checkpoint.
`Trainer` strings them together over the config's stages, with a progress bar, metrics and
exact resume. Parallelism (3D) is applied from outside by wrapping these same pieces.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from familial.checkpoint_io import import_checkpoint, load_family
from familial.config import ConfigError, FamilyConfig
from familial.model import DecoderLayer, FamilyModel
from familial.train import checkpoint as ckpt
from familial.data import Batches, DocumentRows, MixtureRows, StreamRows, open_shards
from familial.train.config import (DataConfig, InitConfig, LossConfig, OptimConfig, StageConfig,
                                   TrainConfig, save_resolved)
from familial.train.losses import count_targets, family_loss_sums, total_objective
from familial.train.metrics import MetricsWriter
from familial.train.schedules import lr_at, weight_at


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(init: InitConfig, seed: int, scratch_dir: Path) -> FamilyModel:
    """The starting family: a family checkpoint, an imported dense checkpoint, or random."""
    if init.family is not None:
        return load_family(init.family)
    if init.hf is not None:
        scratch_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch_dir) as temp:
            import_checkpoint(init.hf, Path(temp) / "family", exits=init.exits,
                              branch_layers=init.branch_layers, shared_head=init.shared_head,
                              member_names=init.member_names)
            return load_family(Path(temp) / "family")
    torch.manual_seed(seed)
    config = FamilyConfig.from_dict(init.model.to_dict(), where="init.model")
    return FamilyModel(config)


def check_data_fits(stages: list[StageConfig], config: FamilyConfig) -> None:
    """Refuse data the model cannot read (rows past its positions, ids past its vocabulary)
    before anything is written, naming the field or file at fault."""
    for stage in stages:
        if stage.data.seq_len > config.max_position_embeddings:
            raise ConfigError(f"train config: stage '{stage.name}' field 'data.seq_len' = {stage.data.seq_len}: "
                              f"longer than the model's max_position_embeddings "
                              f"({config.max_position_embeddings})")
        for source in stage.data.sources:
            shards = open_shards(source.path)
            vocab = shards.vocab_size
            if vocab is None:
                # A Megatron index names no vocabulary: scan its ids, unless its dtype
                # cannot hold one outside the model's.
                if np.issubdtype(shards.tokens.dtype, np.unsignedinteger) and \
                        np.iinfo(shards.tokens.dtype).max < config.vocab_size:
                    continue
                shards.check_token_ids(config.vocab_size)
            elif vocab > config.vocab_size:
                raise ConfigError(f"{Path(source.path) / 'manifest.json'}: vocab_size {vocab} is larger than "
                                  f"the model's vocab_size {config.vocab_size} (the shards were tokenised "
                                  f"for another model)")


def tokenizer_source(init: InitConfig) -> str | None:
    return init.tokenizer or init.family or init.hf


def matches(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch patterns on parameter names; "re:<regex>" for a regular expression."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze parameters matching `patterns`, unfreeze all others; returns the frozen names."""
    frozen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not matches(name, patterns))
        if not parameter.requires_grad:
            frozen.append(name)
    for pattern in patterns:
        if not any(matches(name, [pattern]) for name, _ in model.named_parameters()):
            raise ConfigError(f"train config: field 'freeze' pattern {pattern!r} matches no parameter")
    return frozen


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over every parameter (frozen ones have no gradient, so AdamW leaves them alone);
    matrices decay, norms and biases do not."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations.

    The layer's forward is wrapped in place, so parameter names (and checkpoints) do not change.
    """
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            inner = module.forward
            module.forward = functools.partial(checkpoint, inner, use_reentrant=False)


def exit_weights(loss: LossConfig, config: FamilyConfig, step: int) -> tuple[dict[int, float], dict[int, float]]:
    """lambda_k(step) and distillation weights mu_k(step) for every exit."""
    lambdas = {e: loss.default_lambda for e in config.exits}
    distill = {}
    for table, out, name in ((loss.lambdas, lambdas, "lambdas"), (loss.distill, distill, "distill")):
        for key, schedule in table.items():
            try:
                exit_layer = config.resolve_member(key)
            except ConfigError as error:
                raise ConfigError(f"train config: field 'loss.{name}' key {key!r}: {error}") from None
            out[exit_layer] = weight_at(schedule, step)
    distill.pop(config.exits[-1], None)
    return lambdas, distill


@dataclass
class StepResult:
    ce: dict[int, float]                 # mean cross-entropy per exit over the step's targets
    kd: dict[int, float]                 # mean KL per distilled exit
    loss: float                          # the weighted objective
    grad_norm: float
    targets: int
    tokens: int
    skipped: bool                        # non-finite loss or gradient: weights not updated


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, torch.Tensor]],
               lambdas: dict[int, float], distill: dict[int, float], chunk_size: int,
               grad_clip: float = 0.0, autocast: str = "none", forward: nn.Module | None = None) -> StepResult:
    """One optimizer step over micro-batches, each loss normalised by the step's target count.

    `forward` is the module to call (e.g. a compiled wrapper of `model`). Exits with zero
    weight are not computed. A non-finite loss or gradient skips the update.
    """
    forward = forward or model
    total = sum(count_targets(b["labels"]) for b in micro_batches)
    ce: dict[int, float] = {}
    kd: dict[int, float] = {}
    objective, tokens = 0.0, 0
    device_type = next(model.parameters()).device.type
    for batch in micro_batches:
        context = (torch.autocast(device_type, dtype=torch.bfloat16) if autocast == "bf16"
                   else contextlib.nullcontext())
        with context:
            losses = family_loss_sums(forward, batch["input_ids"], batch["labels"], lambdas, distill,
                                      chunk_size)
            loss = total_objective(losses, total)
        loss.backward()
        objective += loss.item()
        tokens += batch["input_ids"].numel()
        for e, part in losses.items():
            ce[e] = ce.get(e, 0.0) + part.ce_sum.item()
            if distill.get(e):
                kd[e] = kd.get(e, 0.0) + part.kd_sum.item()
    parameters = [p for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else math.inf))
    skipped = not (math.isfinite(objective) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scale = max(total, 1)
    return StepResult({e: v / scale for e, v in ce.items()}, {e: v / scale for e, v in kd.items()},
                      objective, grad_norm, total, tokens, skipped)


def build_batches(data: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> Batches:
    """Batches of a stage's data: one source, or a fixed-ratio mixture of several.

    Shards with a loss mask (chat data) are packed whole-document; others are windows of
    the token stream, unless a source says otherwise.
    """
    rows = []
    for i, source in enumerate(data.sources):
        shards = open_shards(source.path)
        packing = source.packing
        if packing == "auto":
            packing = "documents" if shards.loss_mask is not None else "stream"
        rows.append(StreamRows(shards, data.seq_len, seed + i) if packing == "stream"
                    else DocumentRows(shards, data.seq_len, seed + i))
    mixed = rows[0] if len(rows) == 1 else MixtureRows(
        rows, [s.weight for s in data.sources], [s.path for s in data.sources])
    return Batches(mixed, data.batch_size, rank, world_size)


LoaderFactory = Callable[[DataConfig, int], Batches]


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done over all stages
    stage: int = 0
    stage_step: int = 0
    bad_in_a_row: int = 0
    skipped: int = 0
    loader: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Runs a TrainConfig's stages in sequence in one run directory, resumable at any checkpoint."""

    def __init__(self, config: TrainConfig, resume: str | None = None,
                 loader_factory: LoaderFactory = build_batches) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.stages: list[StageConfig] = config.resolved_stages()
        self.loader_factory = loader_factory
        self.state = TrainState()
        if resume is not None:
            path = ckpt.find_checkpoint(resume, self.run_dir)
            self.model, optimizer_state, saved = ckpt.load_checkpoint(path)
            self.state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__})
        else:
            existing = ckpt.list_checkpoints(self.run_dir)
            if existing:
                # A fresh run here would interleave its checkpoints and metrics with the old run's.
                raise ConfigError(f"{self.run_dir}: already holds checkpoints of a run (latest "
                                  f"{existing[-1].name}); pass --resume to continue it, or choose "
                                  f"another run_dir")
            seed_everything(config.seed)
            self.model = build_model(config.init, config.seed, self.run_dir)
            optimizer_state = None
        check_data_fits(self.stages, self.model.config)
        self.model.to(config.device)
        self.optimizer = build_optimizer(self.model, config.optim, self.stages[0].lr.lr)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        if config.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        self.forward = torch.compile(self.model) if config.compile else self.model

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def run(self, max_steps: int | None = None) -> TrainState:
        """Train to the end (or until `max_steps` global steps are done); returns the state."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(self.config, self.run_dir)
        metrics = MetricsWriter(self.run_dir, self.config.log.tensorboard,
                                resume_step=self.state.step or None)
        stop = min(max_steps or self.total_steps, self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step",
                   disable=not self.config.log.progress, dynamic_ncols=True)
        try:
            while self.state.stage < len(self.stages) and self.state.step < stop:
                self._run_stage(metrics, bar, stop)
        finally:
            bar.close()
            metrics.close()
        return self.state

    def _run_stage(self, metrics: MetricsWriter, bar: tqdm, stop: int) -> None:
        stage = self.stages[self.state.stage]
        device = self.config.device
        freeze(self.model, stage.freeze)
        loader = self.loader_factory(stage.data, self.config.seed + self.state.stage)
        if self.state.loader:
            loader.load_state_dict(self.state.loader)
        bar.set_description(f"train [{stage.name}]")
        while self.state.stage_step < stage.steps and self.state.step < stop:
            lr = lr_at(stage.lr, self.state.stage_step, stage.steps)
            set_lr(self.optimizer, lr)
            lambdas, distill = exit_weights(stage.loss, self.model.config, self.state.stage_step)
            micro = [{k: v.to(device) for k, v in next(loader).items()}
                     for _ in range(stage.data.grad_accum)]
            start = time.perf_counter()
            result = train_step(self.model, self.optimizer, micro, lambdas, distill,
                                stage.loss.chunk_size, self.config.optim.grad_clip,
                                self.config.autocast, self.forward)
            elapsed = time.perf_counter() - start
            self.state.step += 1
            self.state.stage_step += 1
            self.state.loader = loader.state_dict()
            record = self._record(stage, result, lambdas, distill, lr, elapsed)
            if self.state.step % self.config.log.every == 0 or result.skipped:
                metrics.write(record)
            self._count_bad(result)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{result.tokens / elapsed:.0f}")
            every = self.config.checkpoint.every
            if every and self.state.step % every == 0 and self.state.stage_step < stage.steps:
                self.save()
        if self.state.stage_step >= stage.steps:
            self.state.stage += 1
            self.state.stage_step = 0
            self.state.loader = {}
            self.save()
        else:
            self.save()

    def _count_bad(self, result: StepResult) -> None:
        if not result.skipped:
            self.state.bad_in_a_row = 0
            return
        self.state.skipped += 1
        self.state.bad_in_a_row += 1
        tqdm.write(f"step {self.state.step}: non-finite loss or gradient, update skipped "
                   f"({self.state.bad_in_a_row} in a row)")
        if self.state.bad_in_a_row >= self.config.max_bad_steps:
            raise NonFiniteError(f"{self.state.bad_in_a_row} consecutive non-finite steps (max_bad_steps = "
                                 f"{self.config.max_bad_steps}); last good weights are in the latest checkpoint")

    def _record(self, stage: StageConfig, result: StepResult, lambdas: dict[int, float],
                distill: dict[int, float], lr: float, elapsed: float) -> dict[str, Any]:
        name = self.model.config.member_name
        record: dict[str, Any] = {"step": self.state.step, "stage": stage.name, "lr": lr,
                                  "loss": result.loss, "grad_norm": result.grad_norm,
                                  "tokens_per_s": result.tokens / elapsed, "targets": result.targets,
                                  "skipped": result.skipped}
        for e, value in result.ce.items():
            record[f"loss/{name(e)}"] = value
        for e, value in lambdas.items():
            record[f"lambda/{name(e)}"] = value
        for e, value in result.kd.items():
            record[f"kd/{name(e)}"] = value
            record[f"mu/{name(e)}"] = distill[e]
        return record

    def save(self) -> Path:
        state = {k: getattr(self.state, k) for k in TrainState.__dataclass_fields__}
        return ckpt.save_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer, state,
                                    tokenizer_source(self.config.init), self.config.checkpoint.keep)

    def final_family(self) -> Path:
        """The latest checkpoint's family directory (what `familial export` takes)."""
        return ckpt.list_checkpoints(self.run_dir)[-1] / "family"
