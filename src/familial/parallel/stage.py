"""A pipeline stage: trunk layers [start, stop) of the family with the exits that live there.

The stage keeps the family's attribute names (`model.layers.<i>`, `branches.<e>`, `lm_head`),
so parameter FQNs are the family's own (checkpoints are layout-independent) and the family's
own walk (`FamilyModel.walk`) and exit lookups run on it unchanged: parts a stage does not
hold (embedding, final norm, heads) are None.

An exit whose branch starts inside the stage computes its loss there, and its gradient
enters the stage's backward through `_InjectExitLoss`: an identity on the trunk's hidden
state whose backward also sends gradient 1 into the exit loss (Megatron does this for MoE
auxiliary losses). So a single backward from the stage output (or the received output
gradient) covers every exit in the stage, and the pipeline schedule needs to know nothing
about exits. A self-distilled exit needs the deepest exit's logits, so it must lie on the
last stage, where its loss is computed after the trunk's end.

Each loss is `(lambda_k CE_k + mu_k KL_k) / global_targets` with the global target count
of the whole optimizer step, so gradients summed over micro-batches and ranks are exact.
Loss values are recorded in backward, which runs once per real micro-batch.
"""

from __future__ import annotations

import torch
from torch import nn

from familial.model import FamilyModel
from familial.train.losses import ExitSums, exit_loss_sum

Record = tuple[int, ExitSums[torch.Tensor]]  # (exit, its token-loss sums) of one micro-batch


class _InjectExitLoss(torch.autograd.Function):
    """hidden -> hidden; in backward also d(total)/d(exit_loss) = 1, and the loss is recorded."""

    @staticmethod
    def forward(ctx, hidden, exit_loss, record, records):
        ctx.record, ctx.records = record, records
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        ctx.records.append(ctx.record)
        return grad_hidden, torch.ones((), dtype=torch.float32, device=grad_hidden.device), None, None


class _RecordLoss(torch.autograd.Function):
    """Identity on the stage's final loss that records its exits' values when backward reaches it."""

    @staticmethod
    def forward(ctx, loss, recorded, records):
        ctx.recorded, ctx.records = recorded, records
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        ctx.records.extend(ctx.recorded)
        return grad, None, None


class FamilyStage(nn.Module):
    """Trunk layers [start, stop) of `family`, plus the exits whose branch starts there.

    forward(x, labels): x is input_ids (B, T) on the first stage, else the hidden state from
    the previous stage; returns the hidden state, or on the last stage the weighted loss of
    the micro-batch (its exits' losses flow in through backward, not through this value).
    """

    # The family's own walk and exit lookups (the stage keeps the family's attribute names).
    walk = FamilyModel.walk
    run_branch = FamilyModel.run_branch
    branch_layers = FamilyModel.branch_layers
    exit_norm = FamilyModel.exit_norm
    exit_head = FamilyModel.exit_head

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
        # Set by the layout before each step: loss weights and the step's global target count.
        self.exit_weights: dict[int, float] = {e: 1.0 for e in config.exits}
        self.distill: dict[int, float] = {}
        self.global_targets = 1
        self.records: list[Record] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed_tokens(x) if self.is_first else x
        batch, length = labels.shape
        positions = torch.arange(length, device=hidden.device).expand(batch, length)
        rotary = self.model.rotary_emb(positions, hidden.dtype)
        students: dict[int, torch.Tensor] = {}

        def attach(exit_layer: int, branch: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
            if self.distill.get(exit_layer):
                students[exit_layer] = branch  # its loss needs the teacher: computed at the end
                return trunk
            if not self.exit_weights.get(exit_layer):
                return trunk
            objective, record = self._exit_loss(exit_layer, branch, labels)
            return _InjectExitLoss.apply(trunk, objective, record, self.records)

        hidden = self.walk(hidden, rotary, self.start, self.stop, self.exits, attach)
        if not self.is_last:
            return hidden
        final = self.config.exits[-1]
        loss, recorded = self._exit_loss(final, hidden, labels)
        recorded = [recorded]
        teacher = self.exit_norm(final)(hidden)
        for exit_layer, branch in students.items():
            objective, record = self._exit_loss(exit_layer, branch, labels, teacher)
            loss, recorded = loss + objective, recorded + [record]
        return _RecordLoss.apply(loss, recorded, self.records)

    def _exit_loss(self, exit_layer: int, hidden: torch.Tensor, labels: torch.Tensor,
                   teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, Record]:
        """((lambda CE_sum + mu KL_sum) / global_targets, its record) for one exit of one micro-batch."""
        final = self.config.exits[-1]
        loss = exit_loss_sum(self.exit_norm(exit_layer)(hidden), self.exit_head(exit_layer), labels,
                             self.chunk_size, teacher, self.exit_head(final) if teacher is not None else None,
                             self.exit_weights.get(exit_layer, 0.0), self.distill.get(exit_layer, 0.0),
                             scale=1.0 / max(self.global_targets, 1), eager=exit_layer == final)
        return loss.objective, (exit_layer, loss.sums)

    def take_records(self) -> list[Record]:
        """(exit, token-loss sums) of each micro-batch run since the last call."""
        records, self.records = self.records, []
        return records
