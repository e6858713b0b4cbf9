"""A contiguous slice of the family (trunk layers a..b-1 with the exits that live there) as a module.

Every parallel path runs the family through `FamilyStage`: one stage holding everything when
there is no pipeline, or one stage per pipeline rank (several with interleaved schedules).
The stage keeps the family's attribute names (`model.layers.<i>`, `branches.<e>`, `lm_head`),
so parameter FQNs are the family's own and checkpoints are layout-independent.

An exit whose branch starts inside the stage computes its loss there, and its gradient enters
the stage's backward through `_InjectExitLoss`: an identity on the trunk's hidden state whose
backward also sends gradient 1 into the exit loss (Megatron does this for MoE auxiliary
losses). So a single backward from the stage output (or the received output gradient) covers
every exit in the stage, and the pipeline schedule needs to know nothing about exits.

Each loss is `lambda_k * sum(token CE) / global_targets`, with the global target count of the
whole optimizer step, so gradients summed over micro-batches and ranks are exact. Loss values
are recorded in backward, which runs once per real micro-batch (never for the pipeline's
shape-inference forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from familial.model import FamilyModel
from familial.train.losses import IGNORE_INDEX, exit_loss_sum


class _InjectExitLoss(torch.autograd.Function):
    """hidden -> hidden; in backward also d(total)/d(exit_loss) = 1, and the loss is recorded."""

    @staticmethod
    def forward(ctx, hidden, exit_loss, ce_sum, exit_layer, records):
        ctx.record = (exit_layer, ce_sum, records)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        exit_layer, ce_sum, records = ctx.record
        records.append((exit_layer, ce_sum))
        return grad_hidden, torch.ones((), dtype=torch.float32, device=grad_hidden.device), None, None, None


class _RecordLoss(torch.autograd.Function):
    """Identity on the stage's final loss that records its value when backward reaches it."""

    @staticmethod
    def forward(ctx, loss, ce_sum, exit_layer, records):
        ctx.record = (exit_layer, ce_sum, records)
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        exit_layer, ce_sum, records = ctx.record
        records.append((exit_layer, ce_sum))
        return grad, None, None, None


class FamilyStage(nn.Module):
    """Trunk layers [start, stop) of `family`, plus the exits whose branch starts there.

    forward(x, labels): x is input_ids (B, T) on the first stage, else the hidden state from
    the previous stage; returns the hidden state, or on the last stage the weighted loss of
    the micro-batch (its exits' losses flow in through backward, not through this value).
    """

    def __init__(self, family: FamilyModel, start: int, stop: int, chunk_size: int = 1024) -> None:
        super().__init__()
        config = family.config
        self.config = config
        self.start, self.stop = start, stop
        self.is_first, self.is_last = start == 0, stop == config.num_hidden_layers
        self.chunk_size = chunk_size
        final = config.exits[-1]
        self.exits = [e for e in config.exits if start <= e < stop]
        trunk = family.model
        self.model = nn.Module()
        self.model.embed_tokens = trunk.embed_tokens if self.is_first else None
        self.model.layers = nn.ModuleDict({str(i): trunk.layers[str(i)] for i in range(start, stop)})
        self.model.norm = trunk.norm if self.is_last else None
        self.model.rotary_emb = trunk.rotary_emb
        self.branches = nn.ModuleDict(
            {str(e): family.branches[str(e)] for e in self.exits if e != final})
        self.lm_head = family.lm_head if self.is_last or (
            config.shared_head and len(self.exits) > 0) else None
        # Set by the trainer before each step: lambda per exit and the step's global target count.
        self.exit_weights: dict[int, float] = {e: 1.0 for e in config.exits}
        self.global_targets = 1
        self.records: list[tuple[int, torch.Tensor]] = []
        self.loss_parallel = False

    def _exit_head(self, exit_layer: int) -> nn.Module:
        if exit_layer == self.config.exits[-1] or self.config.shared_head:
            return self.lm_head
        return self.branches[str(exit_layer)].lm_head

    def _exit_norm(self, exit_layer: int) -> nn.Module:
        if exit_layer == self.config.exits[-1]:
            return self.model.norm
        return self.branches[str(exit_layer)].norm

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed_tokens(x) if self.is_first else x
        batch, length = labels.shape
        positions = torch.arange(length, device=labels.device).expand(batch, length)
        rotary = self.model.rotary_emb(positions, hidden.dtype)
        final = self.config.exits[-1]
        for i in range(self.start, self.stop):
            if i in self.exits and i != final:
                branch = hidden
                for layer in self.branches[str(i)].layers:
                    branch = layer(branch, rotary)
                weighted, ce_sum = self._exit_loss(i, branch, labels)
                hidden = _InjectExitLoss.apply(hidden, weighted, ce_sum, i, self.records)
            hidden = self.model.layers[str(i)](hidden, rotary)
        if not self.is_last:
            return hidden
        weighted, ce_sum = self._exit_loss(final, hidden, labels)
        return _RecordLoss.apply(weighted, ce_sum, final, self.records)

    def _exit_loss(self, exit_layer: int, hidden: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda * CE_sum / global_targets, detached CE_sum) for one exit of one micro-batch."""
        normed = self._exit_norm(exit_layer)(hidden)
        head = self._exit_head(exit_layer)
        if self.loss_parallel:
            # Vocabulary-sharded logits (B, T, V/tp): cross-entropy on the shards, no gather.
            # The caller holds `loss_parallel()` around forward AND backward (nesting it here
            # would switch the sharded backward off before backward runs).
            logits = head(normed)
            ce_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum")
            if isinstance(ce_sum, DTensor):
                ce_sum = ce_sum.redistribute(placements=[Replicate()]).to_local()
        else:
            # With ce_weight 1 the differentiable objective is the CE sum itself.
            ce_sum = exit_loss_sum(normed, head, labels, self.chunk_size, ce_weight=1.0).objective
        scale = self.exit_weights.get(exit_layer, 0.0) / max(self.global_targets, 1)
        return ce_sum * scale, ce_sum.detach()

    def take_records(self) -> dict[int, torch.Tensor]:
        """Sum of token CE per exit over the micro-batches run since the last call."""
        sums: dict[int, torch.Tensor] = {}
        for exit_layer, value in self.records:
            sums[exit_layer] = sums.get(exit_layer, 0) + value.double()
        self.records.clear()
        return sums
