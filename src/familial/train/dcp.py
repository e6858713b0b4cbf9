"""Distributed checkpoints (torch.distributed.checkpoint) under the family's own parameter names.

    RUN_DIR/checkpoints/dcp-00000020/
        .metadata, __*.distcp   DCP shards: "model.<fqn>" and "optimizer.state.<fqn>.<key>"
        family.json             the family config, so the checkpoint loads without the run
        trainer.json            step, stage, data position, the layout it was saved under
        family/                 on the run's last checkpoint: a plain family checkpoint

Every process writes its own shards into a hidden staging directory; rank 0 renames it into
place once all shards and the metadata are on disk, so a checkpoint is complete or
invisible. An async save writes in a background thread over its own process group and is
published when it completes. Parameter names are the family's under every layout, and DCP
reshards on load, so a checkpoint saved at pp=2 x tp=2 loads at dp_shard=4 or into one
plain process (no process group needed), and `export_family` streams it, tensor by tensor,
into a family checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from familial.checkpoint_io import (
    CheckpointError,
    atomic_directory,
    family_parameter_names,
    save_family_files,
    write_tensors,
)
from familial.config import FamilyConfig
from familial.train import checkpoint as ckpt

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None) -> tuple[dict, list, list]:
    models = [get_model_state_dict(part, options=OPTIONS) for part in parts]
    optims = [get_optimizer_state_dict(part, opt, options=OPTIONS)
              for part, opt in zip(parts, optimizers)] if optimizers else []
    state: dict[str, Any] = {}
    for sd in models:
        state.update({f"model.{k}": v for k, v in sd.items()})
    for sd in optims:
        state.update({f"optimizer.{k}": v for k, v in sd.items()})
    return state, models, optims


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class DistributedCheckpointer:
    """Saves this process's parts as dcp-N checkpoints (collective), synchronously or in the background."""

    def __init__(self, run_dir: Path, family: FamilyConfig, async_save: bool) -> None:
        self.run_dir, self.family, self.async_save = Path(run_dir), family, async_save
        # The background writer's collectives must not interleave with training's.
        self.group = dist.new_group(backend="gloo") if async_save else None
        self.pending: tuple[Future, Path, Path, dict, int] | None = None

    def save(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], step: int,
             trainer_state: dict[str, Any], keep: int) -> Path:
        self.wait()
        target = ckpt.checkpoint_root(self.run_dir) / f"{ckpt.DCP_PREFIX}{step:08d}"
        staging = target.with_name(f".{target.name}.partial")
        if _rank() == 0:
            for stale in target.parent.glob(f".{ckpt.DCP_PREFIX}*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        state, _, _ = _state(parts, optimizers)
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(staging), process_group=self.group)
            self.pending = (future, staging, target, trainer_state, keep)
        else:
            dcp.save(state, checkpoint_id=str(staging))
            dist.barrier()
            self._publish(staging, target, trainer_state, keep)
            dist.barrier()
        return target

    def poll(self) -> None:
        """Publish a background save that has finished (rank 0; others have nothing to rename)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        future, staging, target, trainer_state, keep = self.pending
        self.pending = None
        future.result()
        # The coordinator (rank 0) finishes only after every rank's shards and the metadata are written.
        self._publish(staging, target, trainer_state, keep)

    def _publish(self, staging: Path, target: Path, trainer_state: dict[str, Any], keep: int) -> None:
        if _rank() != 0:
            return
        self.family.save(staging)
        (staging / ckpt.TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        ckpt.prune(self.run_dir, keep)


def load(directory: str | Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None,
         no_dist: bool = False) -> dict[str, Any]:
    """Load weights (and optimizer state) into `parts`, resharding to their layout; returns trainer.json.

    Collective unless `no_dist` (one plain process, e.g. a single-process resume or an export).
    """
    directory = Path(directory)
    if not (directory / ".metadata").exists():
        raise CheckpointError(f"{directory}: not a distributed checkpoint (no .metadata)")
    state, models, optims = _state(parts, optimizers)
    with warnings.catch_warnings():
        # One process on purpose: DCP's warning that no process group exists says nothing here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory), no_dist=no_dist)
    for part, sd in zip(parts, models):
        set_model_state_dict(part, {k: state[f"model.{k}"] for k in sd}, options=OPTIONS)
    for part, opt, sd in zip(parts, optimizers or [], optims):
        set_optimizer_state_dict(part, opt, {k: state[f"optimizer.{k}"] for k in sd}, options=OPTIONS)
    return json.loads((directory / ckpt.TRAINER_STATE).read_text())


def export_family(directory: str | Path, out: str | Path | None = None, tokenizer_source: str | Path | None = None,
                  overwrite: bool = False) -> Path:
    """Write a dcp-N checkpoint's weights as a family checkpoint (default: DIRECTORY/family).

    Tensor by tensor, so the exporting process never holds more than one safetensors shard;
    no process group is needed (run it after training's collectives have ended).
    """
    directory = Path(directory)
    out = Path(out) if out is not None else directory / "family"
    config = FamilyConfig.load(directory)
    shapes = family_parameter_names(config)

    def read(name: str) -> torch.Tensor:
        holder = {f"model.{name}": torch.empty(shapes[name], dtype=torch.float32)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(holder, checkpoint_id=str(directory), no_dist=True)
        return holder[f"model.{name}"]

    plan = {name: (lambda name=name: read(name)) for name in shapes}
    sizes = {name: 4 * int(torch.Size(shape).numel()) for name, shape in shapes.items()}
    config.torch_dtype = "float32"
    with atomic_directory(out, overwrite) as staging:
        save_family_files(config, staging, write_tensors(plan, sizes, staging), tokenizer_source)
    return out
