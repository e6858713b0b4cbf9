"""Distributed checkpoints (torch.distributed.checkpoint) with the family's global names.

    CHECKPOINT/
        .metadata, __*.distcp   DCP shards: "model.<fqn>" and "optimizer.state.<fqn>.<key>"
        family.json             the family config, so the checkpoint loads without the run
        trainer.json            step, the layout it was saved under, caller extras

Parameter names are the family's own under every layout (stages keep them), and DCP
reshards on load, so a checkpoint saved at pp=2 x tp=2 loads at dp_shard=4 or into one
plain process (`load_into_model`), and `export_family` turns it into a family checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
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

from familial.checkpoint_io import CheckpointError, save_family
from familial.config import FamilyConfig
from familial.model import FamilyModel

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _part_states(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None):
    models = [get_model_state_dict(part, options=OPTIONS) for part in parts]
    optims = [get_optimizer_state_dict(part, opt, options=OPTIONS)
              for part, opt in zip(parts, optimizers)] if optimizers else []
    return models, optims


def _combined(models: list[dict], optims: list[dict]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for sd in models:
        state.update({f"model.{k}": v for k, v in sd.items()})
    for sd in optims:
        state.update({f"optimizer.{k}": v for k, v in sd.items()})
    return state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(directory: str | Path, trainer, step: int, extra: dict[str, Any] | None = None) -> Path:
    """Collective: every rank writes its shards; the directory appears only once complete."""
    target = Path(directory)
    staging = target.with_name(f".{target.name}.partial")
    if _rank() == 0 and staging.exists():
        shutil.rmtree(staging)
    _barrier()
    models, optims = _part_states(trainer.parts, trainer.optimizers)
    dcp.save(_combined(models, optims), checkpoint_id=str(staging))
    _barrier()
    if _rank() == 0:
        trainer.config.save(staging)
        info = {"step": step, "layout": dict(zip(("pp", "dp_replicate", "dp_shard", "tp"), trainer.dims.shape())),
                **(extra or {})}
        (staging / "trainer.json").write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    _barrier()
    return target


def _load(directory: str | Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None,
          no_dist: bool = False) -> dict:
    directory = Path(directory)
    if not (directory / ".metadata").exists():
        raise CheckpointError(f"{directory}: not a distributed checkpoint (no .metadata)")
    models, optims = _part_states(parts, optimizers)
    state = _combined(models, optims)
    dcp.load(state, checkpoint_id=str(directory), no_dist=no_dist)
    for part, sd in zip(parts, models):
        set_model_state_dict(part, {k: state[f"model.{k}"] for k in sd}, options=OPTIONS)
    for part, opt, sd in zip(parts, optimizers or [], optims):
        set_optimizer_state_dict(part, opt, {k: state[f"optimizer.{k}"] for k in sd}, options=OPTIONS)
    return json.loads((directory / "trainer.json").read_text())


def load_checkpoint(directory: str | Path, trainer) -> dict[str, Any]:
    """Collective: load weights and optimizer state into this rank's stages; returns trainer.json."""
    return _load(directory, trainer.parts, trainer.optimizers)


def load_into_model(directory: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint saved under any layout into one plain FamilyModel (and its optimizer).

    Not collective: one rank of a running job may call it (e.g. to export).
    """
    return _load(directory, [model], [optimizer] if optimizer is not None else None, no_dist=True)


def export_family(directory: str | Path, out: str | Path, tokenizer_source: str | Path | None = None,
                  overwrite: bool = False) -> Path:
    """Convert a distributed checkpoint into a plain family checkpoint (`familial export` reads it)."""
    model = FamilyModel(FamilyConfig.load(directory))
    load_into_model(directory, model)
    return save_family(model, out, tokenizer_source=tokenizer_source, overwrite=overwrite)
