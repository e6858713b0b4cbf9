"""`familial train` under torchrun: the trainer's stages, schedules and metrics on a DeviceMesh.

Reuses the single-process trainer's pieces (model init, optimizer groups, LR and lambda
schedules, data batches, metrics) and swaps the step for `ParallelTrainer`'s. Each
data-parallel rank reads its own slice of every batch; tensor and pipeline ranks of a
data-parallel group read the same one. Checkpoints are DCP directories
`RUN_DIR/checkpoints/dcp-<step>` (resumable under any layout); the run ends by exporting
a plain family checkpoint to `RUN_DIR/family`.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from familial.checkpoint_io import CheckpointError
from familial.config import ConfigError
from familial.parallel.checkpoint import export_family, load_checkpoint, save_checkpoint
from familial.parallel.mesh import ParallelDims, init_distributed
from familial.parallel.train import ParallelOptions, ParallelTrainer
from familial.train.config import TrainConfig, save_resolved
from familial.train.loop import (NonFiniteError, apply_activation_checkpointing, build_batches, build_model,
                                 build_optimizer, check_data_fits, exit_weights, matches, seed_everything,
                                 set_lr, tokenizer_source)
from familial.train.metrics import MetricsWriter
from familial.train.schedules import lr_at

PREFIX = "dcp-"


def is_parallel_launch(config: TrainConfig) -> bool:
    """True under torchrun with several processes, or when the config asks for a layout."""
    p = config.parallel
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or any(
        getattr(p, name) != 1 for name in ("dp_shard", "dp_replicate", "tp", "pp"))


def layout(config: TrainConfig, world_size: int) -> ParallelDims:
    p = config.parallel
    dp_shard = p.dp_shard
    if dp_shard == 1 and p.dp_replicate * p.tp * p.pp * dp_shard != world_size:
        # The default dp_shard = 1 means "not asked for": FSDP takes the ranks left over.
        dp_shard = -1
    return ParallelDims(dp_shard=dp_shard, dp_replicate=p.dp_replicate, tp=p.tp, pp=p.pp).resolve(world_size)


def latest_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    found = sorted(p for p in root.glob(f"{PREFIX}*") if (p / ".metadata").is_file()) if root.is_dir() else []
    if not found:
        raise CheckpointError(f"{root}: no distributed checkpoint ({PREFIX}<step>) to resume from")
    return found[-1]


def run_parallel(config: TrainConfig, resume: str | None = None) -> int:
    if config.compile:
        raise ConfigError("train config: field 'compile' = True: torch.compile is not wired into parallel"
                          " runs yet; set compile = false")
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        raise ConfigError("train config: field 'parallel' asks for a parallel layout: launch with torchrun"
                          " --nproc-per-node N (N = pp x dp_replicate x dp_shard x tp)")
    dims = layout(config, world)
    p = config.parallel
    device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    stages = config.resolved_stages()
    run_dir = Path(config.run_dir)
    seed_everything(config.seed)
    family = build_model(config.init, config.seed, run_dir)
    check_data_fits(stages, family.config)
    if config.activation_checkpointing:
        apply_activation_checkpointing(family)
    names = [name for name, _ in family.named_parameters()]
    options = ParallelOptions(schedule=p.pp_schedule, microbatches=p.microbatches,
                              sequence_parallel=p.sequence_parallel,
                              param_dtype="bfloat16" if config.autocast == "bf16" else None,
                              chunk_size=stages[0].loss.chunk_size)
    trainer = ParallelTrainer(family, dims, options, device=device,
                              optimizer=lambda part: build_optimizer(part, config.optim, stages[0].lr.lr))
    del family
    dp_mesh = trainer.mesh["dp_replicate", "dp_shard"]._flatten("dp")
    dp_rank, dp_size = dp_mesh.get_local_rank(), dims.dp
    step, stage_index, stage_step = 0, 0, 0
    loaders: list[dict] = []
    if resume is not None:
        path = latest_checkpoint(run_dir) if resume in ("", "latest", "auto") else Path(resume)
        saved = load_checkpoint(path, trainer)
        step, stage_index, stage_step = saved["step"], saved["stage"], saved["stage_step"]
        same_dp = saved["layout"]["dp_replicate"] * saved["layout"]["dp_shard"] == dp_size
        loaders = saved.get("loaders", []) if same_dp else []
    elif any((run_dir / "checkpoints").glob(f"{PREFIX}*")):
        # As the single-process trainer: a fresh run must not mix its checkpoints with another's.
        raise ConfigError(f"{run_dir}: already holds distributed checkpoints of a run; pass --resume "
                          f"to continue it, or choose another run_dir")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(config, run_dir)
        print(f"parallel layout pp={dims.pp} dp_replicate={dims.dp_replicate} dp_shard={dims.dp_shard}"
              f" tp={dims.tp} on {world} ranks; stages {trainer.boundaries}", flush=True)
    metrics = MetricsWriter(run_dir, config.log.tensorboard, resume_step=step or None) if rank == 0 else None
    loader = None
    try:
        bad_in_a_row = 0
        while stage_index < len(stages):
            stage = stages[stage_index]
            for pattern in stage.freeze:
                if not any(matches(name, [pattern]) for name in names):
                    raise ConfigError(f"train config: field 'freeze' pattern {pattern!r} matches no parameter")
            for part in trainer.parts:
                for name, parameter in part.named_parameters():
                    parameter.requires_grad_(not matches(name, stage.freeze))
            loader = build_batches(stage.data, config.seed + stage_index, dp_rank, dp_size)
            if loaders and stage_step:
                loader.load_state_dict(loaders[dp_rank])
            while stage_step < stage.steps:
                lr = lr_at(stage.lr, stage_step, stage.steps)
                for optimizer in trainer.optimizers:
                    set_lr(optimizer, lr)
                lambdas, distill = exit_weights(stage.loss, trainer.config, stage_step)
                if any(distill.values()):
                    raise ConfigError("train config: field 'loss.distill': self-distillation is not available"
                                      " in parallel runs yet (a vocabulary-sharded log_softmax outside"
                                      " cross-entropy gets a wrong gradient under loss_parallel)")
                micro = [next(loader) for _ in range(stage.data.grad_accum)]
                input_ids = torch.cat([b["input_ids"] for b in micro])
                labels = torch.cat([b["labels"] for b in micro])
                start = time.perf_counter()
                ce = trainer.forward_backward(input_ids, labels, lambdas)
                grad_norm = trainer.clip_grad_norm(config.optim.grad_clip or None)
                objective = sum(lambdas.get(e, 0.0) * v for e, v in ce.items())
                skipped = not (math.isfinite(objective) and math.isfinite(grad_norm))
                # objective and grad_norm are reduced over all ranks, so every rank agrees here.
                bad_in_a_row = bad_in_a_row + 1 if skipped else 0
                if bad_in_a_row >= config.max_bad_steps:
                    raise NonFiniteError(f"{bad_in_a_row} consecutive non-finite steps (max_bad_steps = "
                                         f"{config.max_bad_steps}); last good weights are in the latest checkpoint")
                if skipped:
                    for optimizer in trainer.optimizers:
                        optimizer.zero_grad(set_to_none=True)
                else:
                    trainer.optimizer_step()
                elapsed = time.perf_counter() - start
                step, stage_step = step + 1, stage_step + 1
                if metrics is not None and (step % config.log.every == 0 or skipped):
                    name = trainer.config.member_name
                    record = {"step": step, "stage": stage.name, "lr": lr, "loss": objective,
                              "grad_norm": grad_norm, "skipped": skipped,
                              "tokens_per_s": input_ids.numel() * dp_size / elapsed}
                    record.update({f"loss/{name(e)}": v for e, v in ce.items()})
                    record.update({f"lambda/{name(e)}": v for e, v in lambdas.items()})
                    metrics.write(record)
                every = config.checkpoint.every
                if every and step % every == 0 and stage_step < stage.steps:
                    _save(run_dir, trainer, dp_mesh, step, stage_index, stage_step, loader)
            stage_index, stage_step = stage_index + 1, 0
        path = _save(run_dir, trainer, dp_mesh, step, stage_index, stage_step, loader)
        if rank == 0:
            family_dir = export_family(path, run_dir / "family", tokenizer_source(config.init), overwrite=True)
            print(f"done: {step} steps; family checkpoint: {family_dir}", flush=True)
        dist.barrier()
    finally:
        if metrics is not None:
            metrics.close()
        dist.destroy_process_group()
    return 0


def _save(run_dir: Path, trainer: ParallelTrainer, dp_mesh, step: int, stage: int, stage_step: int,
          loader) -> Path:
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, loader.state_dict() if loader is not None else {})
    # One loader state per data-parallel rank, in dp-rank order.
    ranks = dist.get_process_group_ranks(dp_mesh.get_group())
    loaders = [states[r] for r in ranks]
    extra = {"stage": stage, "stage_step": stage_step, "loaders": loaders}
    return save_checkpoint(run_dir / "checkpoints" / f"{PREFIX}{step:08d}", trainer, step, extra)
