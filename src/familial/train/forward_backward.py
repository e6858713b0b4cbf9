"""One optimizer step's forward/backward over its micro-batches, shared by every layout.

Micro-batches run one after another (activation memory is one micro-batch's, whatever
`grad_accum` is), each loss divided by the step's global target count so the summed
gradients are exactly one big batch's. `sync(last)` tells a data-parallel layout whether
the micro-batch about to run is the step's last (`familial.parallel.fsdp.accumulation_sync`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from familial.train.losses import ExitSums, family_loss_sums


@dataclass
class StepSums:
    """Token-loss sums of one step, over every micro-batch (and, once reduced, every rank)."""

    per_exit: ExitSums[dict[int, float]]  # each term's sum per exit it was computed for
    targets: int                          # target tokens of the global batch
    tokens: int                           # input tokens of the global batch

    def objective(self, lambdas: dict[int, float], distill: dict[int, float]) -> float:
        """sum_k lambda_k CE_k + mu_k KL_k, per target token (the loss that was backpropagated)."""
        return self.per_exit.objective(lambdas, distill) / max(self.targets, 1)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def accumulate(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], lambdas: dict[int, float],
               distill: dict[int, float], chunk_size: int, total_targets: int, device: torch.device,
               autocast: torch.dtype | None = None,
               sync: Callable[[bool], None] | None = None) -> ExitSums[torch.Tensor]:
    """Backward of every micro-batch of a FamilyModel; returns this process's token-loss sums.

    The sums are float64 vectors indexed like `model.config.exits`, left on the device until
    the caller reduces them (no host synchronisation per micro-batch).
    """
    exits = model.config.exits
    sums = ExitSums.zeros(len(exits), device)
    for i, batch in enumerate(micro_batches):
        if sync is not None:
            sync(i == len(micro_batches) - 1)
        # Labels stay on the host: the loss picks target rows there (`exit_loss_sum`).
        input_ids, labels = batch["input_ids"].to(device), batch["labels"]
        with autocast_context(device, autocast):
            losses = family_loss_sums(model, input_ids, labels, lambdas, distill, chunk_size,
                                      scale=1.0 / max(total_targets, 1))
            loss = sum(part.objective for part in losses.values())
        loss.backward()
        for e, part in losses.items():
            sums.add_(exits.index(e), part.sums)
        del losses, loss
    return sums


def as_sums(config, sums: ExitSums[torch.Tensor], lambdas: dict[int, float], distill: dict[int, float],
            targets: int, tokens: int) -> StepSums:
    """Host-side StepSums for the exits that were computed."""
    return StepSums(sums.per_exit(config.exits, lambdas, distill), targets, tokens)
