"""The trainer: one loop for every layout, one process being the 1 x 1 x 1 x 1 case.

Stages in sequence, learning-rate and loss-weight schedules, freezing, metrics, progress,
max_steps, periodic and stage-end checkpoints, non-finite steps and exact resume all live
here, once. A layout (`familial.train.layout.LocalLayout`, or
`familial.parallel.layout.ParallelLayout` under torchrun) decides only how a step runs its
forward/backward and how checkpoints are written and read.

Resume continues from the global step a checkpoint holds, placed into the current
config's stages: a finished run resumed with a larger `--steps` trains on; a run resumed
with nothing left to do says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from familial.checkpoint_io import CheckpointError, family_parameter_names
from familial.config import ConfigError, FamilyConfig
from familial.data import Batches, DocumentRows, MixtureRows, StreamRows, open_shards
from familial.text import counted
from familial.train import checkpoint as ckpt
from familial.train.config import (
    DataConfig,
    LossConfig,
    StageConfig,
    TrainConfig,
    save_resolved,
)
from familial.train.init import run_tokenizer, tokenizer_source, weight_source
from familial.train.layout import Layout, LocalLayout
from familial.train.losses import ExitSums
from familial.train.metrics import MetricsWriter, exit_metrics
from familial.train.params import check_patterns
from familial.train.schedules import lr_at, weight_at


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
                # cannot hold one outside the model's. Once per node: the first local rank
                # scans (the others wait for it to join the process group, and a bad id
                # there ends the whole run), so a node reads the tokens once, not once per GPU.
                if np.issubdtype(shards.tokens.dtype, np.unsignedinteger) and \
                        np.iinfo(shards.tokens.dtype).max < config.vocab_size:
                    continue
                if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                    shards.check_token_ids(config.vocab_size)
            elif vocab > config.vocab_size:
                raise ConfigError(f"{Path(source.path) / 'manifest.json'}: vocab_size {vocab} is larger than "
                                  f"the model's vocab_size {config.vocab_size} (the shards were tokenised "
                                  f"for another model)")


def check_stages(stages: list[StageConfig], config: FamilyConfig) -> None:
    """Everything a stage names must exist in the family: checked before anything is written."""
    check_data_fits(stages, config)
    names = list(family_parameter_names(config))
    for stage in stages:
        exit_weights(stage.loss, config, 0)
        check_patterns(stage.freeze, names)


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


def build_batches(data: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> Batches:
    """Batches of a stage's data: one source, or a fixed-ratio mixture of several.

    Shards with a loss mask (chat data) are packed whole-document; others are windows of
    the token stream, unless a source says otherwise. Every data-parallel rank draws the
    same global batch and keeps its slice, so the data position is one state for all.
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


LoaderFactory = Callable[[DataConfig, int, int, int], Batches]
LayoutFactory = Callable[[TrainConfig, FamilyConfig], Layout]


@dataclass
class StepResult:
    per_exit: ExitSums[dict[int, float]]  # each term's mean per exit over the step's targets
    loss: float                           # the weighted objective
    grad_norm: float
    targets: int
    tokens: int
    skipped: bool                         # non-finite loss or gradient: weights not updated


def train_step(layout: Layout, micro_batches: list[dict[str, torch.Tensor]], lambdas: dict[int, float],
               distill: dict[int, float], chunk_size: int, grad_clip: float = 0.0) -> StepResult:
    """One optimizer step: forward/backward of the micro-batches, clipping, the update.

    Exits with zero weight are not computed. A non-finite loss or gradient norm (reduced
    over all ranks, so every rank agrees) skips the update.
    """
    sums = layout.forward_backward(micro_batches, lambdas, distill, chunk_size)
    grad_norm = layout.clip_grad_norm(grad_clip)
    objective = sums.objective(lambdas, distill)
    skipped = not (math.isfinite(objective) and math.isfinite(grad_norm))
    if not skipped:
        layout.optimizer_step()
    layout.zero_grad()
    scale = max(sums.targets, 1)
    means = sums.per_exit.map(lambda values: {e: v / scale for e, v in values.items()})
    return StepResult(means, objective, grad_norm, sums.targets, sums.tokens, skipped)


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done over all stages
    stage: int = 0
    stage_step: int = 0
    bad_in_a_row: int = 0
    skipped: int = 0
    loader: dict[str, Any] = field(default_factory=dict)
    loader_stage: int = 0         # the stage whose data position `loader` is


def saved_family_config(checkpoint: Path) -> FamilyConfig:
    """The family config a checkpoint of either kind was saved with."""
    return FamilyConfig.load(checkpoint if ckpt.is_distributed(checkpoint) else checkpoint / "family")


class Trainer:
    """Runs a TrainConfig's stages in sequence in one run directory, resumable at any checkpoint."""

    def __init__(self, config: TrainConfig, resume: str | None = None,
                 loader_factory: LoaderFactory = build_batches, layout: LayoutFactory = LocalLayout,
                 label: str = "train") -> None:
        self.config, self.label = config, label  # the label names this run's progress bar
        self.run_dir = Path(config.run_dir)
        self.stages: list[StageConfig] = config.resolved_stages()
        self.loader_factory = loader_factory
        self.state = TrainState()
        self._saved_at: int | None = None
        checkpoint = None
        if resume is not None and str(resume) in ("", "latest", "auto") and not ckpt.list_checkpoints(self.run_dir):
            # The same command line starts a run and restarts it (torchrun --max-restarts, a
            # scheduler's requeue): before the first checkpoint, resuming is starting.
            print(f"{self.run_dir}: no checkpoint yet; --resume starts from step 0", flush=True)
            resume = None
        if resume is not None:
            checkpoint = ckpt.find_checkpoint(resume, self.run_dir)
            family = saved_family_config(checkpoint)
        else:
            existing = ckpt.list_checkpoints(self.run_dir)
            if existing:
                # A fresh run here would interleave its checkpoints and metrics with the old run's.
                raise ConfigError(f"{self.run_dir}: already holds checkpoints of a run (latest "
                                  f"{existing[-1].name}); pass --resume to continue it, or choose "
                                  f"another run_dir")
            seed_everything(config.seed)
            source = weight_source(config.init, config.seed)
            family = source.config
        check_stages(self.stages, family)
        tokenizer = run_tokenizer(config.init, self.stages)
        from_shards = tokenizer != tokenizer_source(config.init)
        if from_shards:
            config.init.tokenizer = tokenizer  # the shards' own: every saved family carries it
        self.layout = layout(config, family)
        self.family_config = family
        if from_shards and self.layout.is_main:
            print(f"tokenizer: {tokenizer} (the shards' own; --init.tokenizer to name it)", flush=True)
        if checkpoint is not None:
            saved = self.layout.load(checkpoint)
            self.state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})
            self.state.loader_stage = saved.get("loader_stage", saved.get("stage", 0))
            if not self.state.loader and saved.get("loaders"):
                # Earlier parallel checkpoints kept one (identical) data position per rank.
                self.state.loader = saved["loaders"][0]
            self._saved_at = self.state.step
            self._keep_global_batch(saved.get("global_batch"), saved.get("layout"))
        else:
            self.layout.load_weights(source)
        self._place()

    def _global_batch(self) -> list[int]:
        """Rows per optimizer step of each stage: batch_size x grad_accum x data-parallel ranks."""
        return [stage.data.batch_size * stage.data.grad_accum * self.layout.dp_size for stage in self.stages]

    def _keep_global_batch(self, saved: list[int] | None, layout: dict | None) -> None:
        """Resumed under another data-parallel degree, a stage keeps the global batch it was
        trained with: its grad_accum changes to make up for the ranks, or the resume is refused
        when no whole grad_accum can."""
        if saved is None:
            return
        before = (layout or {}).get("dp_replicate", 1) * (layout or {}).get("dp_shard", 1)
        if before == self.layout.dp_size:
            return
        for index, (stage, rows, now) in enumerate(zip(self.stages, saved, self._global_batch())):
            if rows == now:
                continue
            per_micro = stage.data.batch_size * self.layout.dp_size
            if rows % per_micro:
                raise ConfigError(f"train config: stage '{stage.name}': the checkpoint trained on {rows} rows per "
                                  f"step ({before} data-parallel ranks); with {self.layout.dp_size} ranks and "
                                  f"data.batch_size {stage.data.batch_size} a step is {now} rows and no grad_accum "
                                  f"gives {rows}: set data.batch_size so that {rows} divides by batch_size x "
                                  f"{self.layout.dp_size}")
            accumulation = rows // per_micro
            if self.layout.is_main:
                print(f"stage '{stage.name}': {self.layout.dp_size} data-parallel ranks instead of {before}; "
                      f"grad_accum {stage.data.grad_accum} -> {accumulation} keeps the global batch of {rows} rows",
                      flush=True)
            self.stages[index] = dataclasses.replace(
                stage, data=dataclasses.replace(stage.data, grad_accum=accumulation))

    @property
    def model(self):
        """The family being trained (one-process layouts)."""
        return self.layout.model

    @property
    def optimizer(self):
        return self.layout.optimizer

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def _place(self) -> None:
        """(stage, stage_step) of the global step under the current config's stages."""
        if self.state.step > self.total_steps:
            raise CheckpointError(f"{self.run_dir}: the checkpoint is at step {self.state.step}, beyond the "
                                  f"{self.total_steps} steps configured; pass --steps N with N >= "
                                  f"{self.state.step} (or more [[stages]] steps)")
        done = 0
        for index, stage in enumerate(self.stages):
            if self.state.step < done + stage.steps:
                self.state.stage, self.state.stage_step = index, self.state.step - done
                return
            done += stage.steps
        self.state.stage, self.state.stage_step = len(self.stages), 0

    def run(self, max_steps: int | None = None) -> TrainState:
        """Train to the end (or until `max_steps` global steps are done); returns the state."""
        stop = min(max_steps or self.total_steps, self.total_steps)
        if self.state.step >= stop:
            if self.layout.is_main:
                print(f"{self.run_dir}: {self.state.step} of {self.total_steps} steps already trained; nothing "
                      f"to do (pass --steps N with N > {self.state.step} to train further)", flush=True)
            return self.state
        metrics = None
        if self.layout.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(self.config, self.run_dir)
            metrics = MetricsWriter(self.run_dir, self.config.log.tensorboard, resume_step=self.state.step or None)
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc=self.label, unit="step",
                   disable=not (self.config.log.progress and self.layout.is_main), dynamic_ncols=True)
        try:
            while self.state.stage < len(self.stages) and self.state.step < stop:
                self._run_stage(metrics, bar, stop)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return self.state

    def _run_stage(self, metrics: MetricsWriter | None, bar: tqdm, stop: int) -> None:
        index = self.state.stage
        stage = self.stages[index]
        self.layout.freeze(stage.freeze)
        loader = self.loader_factory(stage.data, self.config.seed + index, self.layout.dp_rank, self.layout.dp_size)
        if self.state.loader and self.state.loader_stage == index:
            loader.load_state_dict(self.state.loader)
        bar.set_description(f"train [{stage.name}]")
        while self.state.stage_step < stage.steps and self.state.step < stop:
            lr = lr_at(stage.lr, self.state.stage_step, stage.steps)
            self.layout.set_lr(lr)
            lambdas, distill = exit_weights(stage.loss, self.family_config, self.state.stage_step)
            micro = [next(loader) for _ in range(stage.data.grad_accum)]
            start = time.perf_counter()
            result = train_step(self.layout, micro, lambdas, distill, stage.loss.chunk_size,
                                self.config.optim.grad_clip)
            elapsed = time.perf_counter() - start
            self.state.step += 1
            self.state.stage_step += 1
            self.state.loader, self.state.loader_stage = loader.state_dict(), index
            if metrics is not None and (self.state.step % self.config.log.every == 0 or result.skipped):
                metrics.write(self._record(stage, result, lambdas, distill, lr, elapsed))
            self._count_bad(result)
            bar.update(1)
            bar.set_postfix_str(self._progress(result, lr, elapsed), refresh=False)
            every = self.config.checkpoint.every
            if every and self.state.step % every == 0 and self.state.stage_step < stage.steps:
                self.save()
            self.layout.poll()
        if self.state.stage_step >= stage.steps:
            self.state.stage += 1
            self.state.stage_step = 0
        self.save()

    def _count_bad(self, result: StepResult) -> None:
        if not result.skipped:
            self.state.bad_in_a_row = 0
            return
        self.state.skipped += 1
        self.state.bad_in_a_row += 1
        if self.layout.is_main:
            tqdm.write(f"step {self.state.step}: non-finite loss or gradient, update skipped "
                       f"({self.state.bad_in_a_row} in a row)")
        if self.state.bad_in_a_row >= self.config.max_bad_steps:
            raise NonFiniteError(f"{self.state.bad_in_a_row} consecutive non-finite steps (max_bad_steps = "
                                 f"{self.config.max_bad_steps}); last good weights are in the latest checkpoint")

    def _progress(self, result: StepResult, lr: float, elapsed: float) -> str:
        """The bar's figures, named: the mean over exits of each exit's CE (not their weighted sum)."""
        ce = result.per_exit.ce
        mean = sum(ce.values()) / max(len(ce), 1)
        deepest = self.family_config.exits[-1]
        full = f", full member {ce[deepest]:.3f}" if deepest in ce else ""
        return (f"mean CE of {counted(len(ce), 'exit')} {mean:.3f}{full} (nats/token), lr {lr:.2e}, "
                f"{result.tokens / elapsed:,.0f} tok/s")

    def _record(self, stage: StageConfig, result: StepResult, lambdas: dict[int, float],
                distill: dict[int, float], lr: float, elapsed: float) -> dict[str, Any]:
        name = self.family_config.member_name
        record: dict[str, Any] = {"step": self.state.step, "stage": stage.name, "lr": lr,
                                  "loss": result.loss, "grad_norm": result.grad_norm,
                                  "tokens_per_s": result.tokens / elapsed, "targets": result.targets,
                                  "skipped": result.skipped}
        record.update(exit_metrics(result.per_exit, lambdas, distill, name))
        return record

    def save(self) -> Path | None:
        """Checkpoint the current step (once: a step already saved is not written again)."""
        if self._saved_at == self.state.step:
            return None
        state = {k: getattr(self.state, k) for k in TrainState.__dataclass_fields__}
        state["global_batch"] = self._global_batch()
        path = self.layout.save(self.state.step, state)
        self._saved_at = self.state.step
        return path

    def finish(self) -> Path | None:
        """End the run: RUN_DIR/family points at the newest checkpoint's family (a parallel run
        first ends its process group, then exports it on rank 0). Returns that path on the
        main process."""
        return self.layout.finish()

    def final_family(self) -> Path:
        """The latest checkpoint's family directory (what `familial export` takes)."""
        return ckpt.list_checkpoints(self.run_dir)[-1] / "family"
