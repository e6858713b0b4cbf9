"""The distributed training step: pipeline x FSDP2/HSDP x tensor parallel over one DeviceMesh.

Order of application (torchtitan's): split into pipeline stages -> tensor parallel ->
FSDP. Each rank holds one `FamilyStage` (two with interleaved schedules) and one optimizer
per stage. `forward_backward` returns the exact per-exit mean losses of the global batch:
token-loss sums recorded per micro-batch, summed over micro-batches, stages and
data-parallel ranks, divided by the global target count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from familial.config import ConfigError
from familial.model import FamilyModel
from familial.parallel.fsdp import apply_fsdp, fsdp_dtype, mixed_precision
from familial.parallel.mesh import ParallelDims, build_mesh
from familial.parallel.pipeline import (
    build_schedule,
    schedule_class,
    check_boundaries,
    split_layers,
    stage_indices,
    stages_per_rank,
)
from familial.parallel.stage import FamilyStage
from familial.parallel.tensor_parallel import apply_tensor_parallel
from familial.train.losses import IGNORE_INDEX


@dataclass
class ParallelOptions:
    # pipeline schedule: GPipe, 1F1B or Interleaved1F1B (two stages per rank)
    schedule: str = "1F1B"
    # micro-batches per step under pp; default: the number of pipeline stages
    microbatches: int | None = None
    # shard the residual stream along the sequence between tensor-parallel blocks
    sequence_parallel: bool = False
    # FSDP compute dtype (e.g. "bfloat16"); master weights and gradient reduction stay float32
    param_dtype: str | None = None
    # explicit stage boundaries [0, ..., L]; default: balanced by cost (split_layers)
    stage_boundaries: list[int] | None = None
    # tokens per head chunk of the (non tensor-parallel) exit losses
    chunk_size: int = 1024


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class ParallelTrainer:
    """Holds this rank's stages of a family, their optimizers and the pipeline schedule."""

    def __init__(self, family: FamilyModel, dims: ParallelDims, options: ParallelOptions | None = None,
                 optimizer: OptimizerFactory | None = None, device: torch.device | str | None = None,
                 mesh: DeviceMesh | None = None) -> None:
        self.options = options = options or ParallelOptions()
        self.dims, self.config = dims, family.config
        self.activation_dtype = fsdp_dtype(options.param_dtype) or next(family.parameters()).dtype
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.mesh = mesh or build_mesh(dims, self.device.type)
        if options.sequence_parallel and dims.tp == 1:
            raise ConfigError("parallel.sequence_parallel = True needs parallel.tp > 1")
        pp_rank = self.mesh["pp"].get_local_rank()
        self.pp_rank = pp_rank
        if dims.pp > 1:
            schedule_class(options.schedule)
            per_rank = stages_per_rank(options.schedule)
            num_stages = dims.pp * per_rank
            bounds = options.stage_boundaries or split_layers(self.config, num_stages)
            if len(bounds) != num_stages + 1:
                raise ConfigError(f"parallel.stage_boundaries = {bounds}: expected {num_stages + 1}"
                                  f" boundaries for {num_stages} stages")
            check_boundaries(self.config, bounds)
            indices = stage_indices(pp_rank, dims.pp, per_rank)
        else:
            num_stages, bounds, indices = 1, [0, self.config.num_hidden_layers], [0]
        self.boundaries = bounds
        self.parts = [FamilyStage(family, bounds[i], bounds[i + 1], options.chunk_size) for i in indices]
        for part in self.parts:
            part.to(self.device)
            if dims.tp > 1:
                apply_tensor_parallel(part, self.mesh["tp"], options.sequence_parallel)
            if dims.dp > 1 or options.param_dtype:
                dp_mesh = self.mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else self.mesh["dp_shard"]
                apply_fsdp(part, dp_mesh, mixed_precision(options.param_dtype),
                           reshard_after_forward=dims.pp == 1)
        self.schedule = None
        self._pipeline_shape: tuple[int, int] | None = None
        self._stage_indices, self._num_stages = indices, num_stages
        self.microbatches = options.microbatches or num_stages
        factory = optimizer or (lambda module: torch.optim.AdamW(module.parameters(), lr=3e-4))
        self.optimizers = [factory(part) for part in self.parts]

    def _pipeline(self, batch: int, length: int):
        """The schedule for (batch, length) batches; built on first use with static stage shapes.

        Static shapes skip the stages' shape-inference pass, whose extra forward and
        backward would otherwise run (and record) the exit losses of one micro-batch twice.
        """
        if self._pipeline_shape == (batch, length):
            return self.schedule
        if batch % self.microbatches:
            raise ConfigError(f"batch size {batch} on each data-parallel rank is not divisible by"
                              f" parallel.microbatches = {self.microbatches}")
        rows = batch // self.microbatches
        local = length
        if self.options.sequence_parallel:
            if length % self.dims.tp:
                raise ConfigError(f"sequence length {length} is not divisible by parallel.tp = {self.dims.tp}"
                                  " (needed by sequence_parallel)")
            local = length // self.dims.tp
        hidden = torch.empty(rows, local, self.config.hidden_size, dtype=self.activation_dtype,
                             device=self.device, requires_grad=True)
        tokens = torch.zeros(rows, length, dtype=torch.long, device=self.device)
        loss = torch.zeros((), dtype=torch.float32, device=self.device, requires_grad=True)
        stages = []
        group = self.mesh["pp"].get_group()
        for part, index in zip(self.parts, self._stage_indices):
            inputs = tokens if part.is_first else hidden
            outputs = loss if part.is_last else hidden
            stages.append(PipelineStage(part, index, self._num_stages, self.device, input_args=inputs,
                                        output_args=outputs, group=group))
        self.schedule = build_schedule(self.options.schedule, stages, self.microbatches)
        self._pipeline_shape = (batch, length)
        return self.schedule

    def _context(self):
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                         exit_weights: dict[int, float]) -> dict[int, float]:
        """Accumulate this rank's gradients of sum_k lambda_k CE_k; return {exit: mean CE_k}.

        Every rank of a data-parallel group passes its own (B, T) batch; tensor and pipeline
        ranks of the same group pass the same batch.
        """
        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        counts = torch.tensor([float((labels != IGNORE_INDEX).sum())], dtype=torch.float64)
        dist.all_reduce(counts)
        # Tensor and pipeline ranks hold copies of their data-parallel group's batch.
        global_targets = int(counts.item()) // (self.dims.tp * self.dims.pp)
        for part in self.parts:
            part.exit_weights = dict(exit_weights)
            part.global_targets = global_targets
        with self._context():
            if self.dims.pp == 1:
                self.parts[0](input_ids, labels).backward()
            elif self.pp_rank == 0:
                self._pipeline(*labels.shape).step(input_ids, target=labels, labels=labels, return_outputs=False)
            else:
                self._pipeline(*labels.shape).step(target=labels, labels=labels, return_outputs=False)
        sums = torch.zeros(len(self.config.exits), dtype=torch.float64)
        for part in self.parts:
            for exit_layer, value in part.take_records().items():
                sums[self.config.exits.index(exit_layer)] += value.cpu()
        dist.all_reduce(sums)
        # Tensor-parallel ranks record identical (replicated) losses.
        sums /= self.dims.tp
        return {e: float(sums[i]) / max(global_targets, 1) for i, e in enumerate(self.config.exits)}

    def parameters(self):
        for part in self.parts:
            yield from part.parameters()

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Global gradient norm over every rank and stage; gradients scaled down to max_norm if given."""
        total = torch.zeros((), dtype=torch.float64)
        for p in self.parameters():
            if p.grad is None:
                continue
            norm = torch.linalg.vector_norm(p.grad.float())
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            total += norm.double().cpu() ** 2
        if self.dims.pp > 1:
            dist.all_reduce(total, group=self.mesh["pp"].get_group())
        norm = float(total.sqrt())
        if max_norm is not None and max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    def optimizer_step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor, exit_weights: dict[int, float],
                   max_grad_norm: float | None = None) -> tuple[dict[int, float], float]:
        losses = self.forward_backward(input_ids, labels, exit_weights)
        norm = self.clip_grad_norm(max_grad_norm)
        self.optimizer_step()
        return losses, norm

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """{family FQN: full gradient} of this rank's stages (collective within each stage's mesh)."""
        out = {}
        for part in self.parts:
            for name, p in part.named_parameters():
                if p.grad is None:
                    continue
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                out[name] = grad.detach().cpu().clone()
        return out

    def full_parameters(self) -> dict[str, torch.Tensor]:
        out = {}
        for part in self.parts:
            for name, p in part.named_parameters():
                out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
        return out
