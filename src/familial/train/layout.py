"""The one-process layout (1 x 1 x 1 x 1), and what every layout provides to the trainer.

The trainer's loop is the same for every layout; a layout decides only how a step runs its
forward/backward and how checkpoints are written and read. `familial.parallel.layout`
holds the N-process one (mesh, tensor parallel, FSDP, pipeline stages, DCP).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from familial.config import FamilyConfig
from familial.train import checkpoint as ckpt
from familial.train import dcp
from familial.train.blocks import apply_block_options
from familial.train.config import TrainConfig
from familial.train.init import (
    WeightSource,
    fill,
    materialize,
    meta_family,
    tokenizer_source,
)
from familial.train.losses import count_targets
from familial.train.params import build_optimizer, freeze, set_lr
from familial.train.forward_backward import StepSums, accumulate, as_sums


class Layout(Protocol):
    config: FamilyConfig
    is_main: bool            # the process that prints and writes run files
    dp_rank: int             # this process's data-parallel rank and the number of them
    dp_size: int

    def load_weights(self, source: WeightSource) -> None: ...
    def load(self, checkpoint: Path) -> dict[str, Any]: ...
    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]: ...
    def freeze(self, patterns: list[str]) -> None: ...
    def set_lr(self, lr: float) -> None: ...
    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], lambdas: dict[int, float],
                         distill: dict[int, float], chunk_size: int) -> StepSums: ...
    def clip_grad_norm(self, max_norm: float) -> float: ...
    def optimizer_step(self) -> None: ...
    def zero_grad(self) -> None: ...
    def save(self, step: int, state: dict[str, Any]) -> Path: ...
    def poll(self) -> None: ...
    def finish(self) -> Path | None: ...


def resolve_device(setting: str) -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK) when CUDA exists, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if setting == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if setting == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(setting)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The matmul dtype `precision` asks for (auto: bf16 on CUDA, fp32 elsewhere)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


class LocalLayout:
    """One process holding the whole family; checkpoints are step-N directories."""

    is_main, dp_rank, dp_size = True, 0, 1

    def __init__(self, train: TrainConfig, config: FamilyConfig) -> None:
        self.train, self.config = train, config
        self.device = resolve_device(train.device)
        dtype = compute_dtype(train.precision, self.device)
        self.autocast = None if dtype == torch.float32 else dtype
        self.model = meta_family(config)
        apply_block_options(self.model, train.activation_checkpointing, train.compile)
        materialize(self.model, self.device)
        self.optimizer = build_optimizer(self.model, train.optim, train.lr.lr)

    def load_weights(self, source: WeightSource) -> None:
        fill([self.model], source)

    def load(self, checkpoint: Path) -> dict[str, Any]:
        """Weights, optimizer state and trainer state from a checkpoint of either kind."""
        if ckpt.is_distributed(checkpoint):
            return dcp.load(checkpoint, [self.model], [self.optimizer], no_dist=True)
        model, optimizer_state, state = ckpt.load_checkpoint(checkpoint)
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                parameter.copy_(model.get_parameter(name))
        self.optimizer.load_state_dict(optimizer_state)
        return state

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.model.named_parameters()

    def freeze(self, patterns: list[str]) -> None:
        freeze(self.model, patterns)

    def set_lr(self, lr: float) -> None:
        set_lr([self.optimizer], lr)

    def forward_backward(self, micro_batches, lambdas, distill, chunk_size) -> StepSums:
        targets = sum(count_targets(b["labels"]) for b in micro_batches)
        tokens = sum(b["input_ids"].numel() for b in micro_batches)
        sums = accumulate(self.model, micro_batches, lambdas, distill, chunk_size, targets, self.device,
                          self.autocast)
        return as_sums(self.config, sums, lambdas, distill, targets, tokens)

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global gradient norm; gradients are rescaled only when it exceeds max_norm."""
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True)
        if 0 < max_norm < norm:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm, foreach=True)
        return float(norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        return ckpt.save_checkpoint(self.train.run_dir, step, self.model, self.optimizer, state,
                                    tokenizer_source(self.train.init), self.train.checkpoint.keep)

    def poll(self) -> None:
        """Nothing runs in the background in one process."""

    def finish(self) -> Path | None:
        """RUN_DIR/family, pointing at the newest checkpoint's family (exported if it is a dcp-N)."""
        return publish_latest_family(self.train)


def publish_latest_family(train: TrainConfig) -> Path | None:
    found = ckpt.list_checkpoints(train.run_dir)
    if not found:
        return None
    family = found[-1] / "family"
    if not family.is_dir():
        family = dcp.export_family(found[-1], tokenizer_source=tokenizer_source(train.init))
    return ckpt.publish_family(train.run_dir, family)
