"""The N-process layout: pipeline x FSDP2/HSDP x tensor parallel over one DeviceMesh.

Built in torchtitan's order on the meta device: split into pipeline stages, then
`familial.parallel.parallelize.parallelize_family` on each (tensor parallel -> activation
checkpointing and compile per block -> FSDP), then each rank
allocates only its shards and reads only its slices of the weights (`familial.train.init`).
The trainer's loop (`familial.train.loop.Trainer`) drives it exactly as it drives one
process; this module decides how a step runs forward/backward and how checkpoints are
written (DCP, `familial.train.dcp`).

A step's micro-batches run one after another, and FSDP reduce-scatters each one's gradients
into the rank's shard (`familial.parallel.fsdp`). With a pipeline, the accumulation
micro-batches become more pipeline micro-batches of a single schedule step (1F1B keeps at
most `stages` of them in flight, so activation memory stays flat), and the stages reduce-
scatter every micro-batch too (`familial.parallel.pipeline.SyncedStage`). Reported per-exit
losses are token sums reduced over micro-batches, stages and data-parallel ranks, divided
by the global target count: exact means, not averages of averages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from familial.checkpoint_io import family_parameter_names
from familial.config import ConfigError, FamilyConfig
from familial.parallel.fsdp import accumulation_sync
from familial.parallel.norm import clip_grad_norm_, settle_partial_grads
from familial.parallel.mesh import build_mesh, dp_rank, init_distributed
from familial.parallel.parallelize import parallelize_family
from familial.parallel.pipeline import (
    SyncedStage,
    build_schedule,
    check_boundaries,
    schedule_class,
    split_layers,
    stage_indices,
    stages_per_rank,
)
from familial.parallel.stage import FamilyStage
from familial.parallel.tensor_parallel import (
    check_tensor_parallel,
)
from familial.train import checkpoint as ckpt
from familial.train import dcp
from familial.train.config import ParallelConfig, TrainConfig
from familial.train.forward_backward import StepSums, accumulate, as_sums, autocast_context
from familial.train.init import (
    WeightSource,
    family_weights,
    fill,
    local_region,
    materialize,
    meta_family,
)
from familial.train.layout import compute_dtype, publish_latest_family, resolve_device
from familial.train.losses import ExitSums, count_targets
from familial.train.params import build_optimizer, freeze, optimizer_order, set_lr


class ParallelLayout:
    """This rank's parts of the family (one, or pipeline stages), their optimizers, and the step."""

    def __init__(self, train: TrainConfig, config: FamilyConfig) -> None:
        init_distributed()
        self.train, self.config = train, config
        check_shared_run_dir(Path(train.run_dir))
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        p = self.parallel = train.parallel.resolve(dist.get_world_size())
        self.device = resolve_device(train.device)
        dtype = compute_dtype(train.precision, self.device)
        if p.tp_enabled:
            check_tensor_parallel(config, p.tp)
        self.mesh = build_mesh(p, self.device.type)
        self.dp_rank, self.dp_size = dp_rank(self.mesh, p), p.dp
        check_distillation(train, config, p)
        family = meta_family(config)
        self.parts, self.boundaries = self._split(family)
        sharded = p.fsdp_enabled
        for part in self.parts:
            parallelize_family(part, self.mesh, p, train, dtype)
            materialize(part, self.device)
        # Sharded parameters are gathered in the compute dtype; unsharded ones run under autocast.
        self.autocast = None if sharded or dtype == torch.float32 else dtype
        self.activation_dtype = dtype if sharded else torch.float32
        self.sharded = sharded
        self.optimizers = [build_optimizer(part, train.optim, train.lr.lr) for part in self.parts]
        self.checkpointer = dcp.DistributedCheckpointer(Path(train.run_dir), config, train.checkpoint.async_save)
        self._schedule, self._schedule_key = None, None
        if self.is_main:
            print(f"parallel config pp={p.pp} dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp} on "
                  f"{p.world_size} ranks; stages {self.boundaries}; {self.device.type}, {str(dtype)[6:]} compute",
                  flush=True)

    def _split(self, family) -> tuple[list, list[int]]:
        p = self.parallel
        if not p.pp_enabled:
            return [family], [0, self.config.num_hidden_layers]
        schedule_class(p.pp_schedule)
        per_rank = stages_per_rank(p.pp_schedule)
        count = p.pp * per_rank
        bounds = p.stage_boundaries or split_layers(self.config, count)
        if len(bounds) != count + 1:
            raise ConfigError(f"parallel.stage_boundaries = {bounds}: expected {count + 1} boundaries for "
                              f"{count} stages")
        check_boundaries(self.config, bounds)
        chunk = self.train.resolved_stages()[0].loss.chunk_size
        indices = stage_indices(self.mesh["pp"].get_local_rank(), p.pp, per_rank)
        self._stage_indices, self._num_stages = indices, count
        return [FamilyStage(family, bounds[i], bounds[i + 1], chunk) for i in indices], bounds

    # Weights and checkpoints.

    def load_weights(self, source: WeightSource) -> None:
        fill(self.parts, source)

    def load(self, checkpoint: Path) -> dict[str, Any]:
        """Weights, optimizer state and trainer state from a checkpoint of either kind, resharded."""
        if ckpt.is_distributed(checkpoint):
            return dcp.load(checkpoint, self.parts, self.optimizers)
        state = ckpt.trainer_state(checkpoint)
        source = family_weights(checkpoint / "family")
        fill(self.parts, source)
        source.close()
        self._load_optimizer(checkpoint / "optimizer.pt")
        return state

    @torch.no_grad()
    def _load_optimizer(self, path: Path) -> None:
        """A one-process AdamW state (indexed by parameter order) into this rank's sharded optimizers."""
        saved = torch.load(path, mmap=True, weights_only=True)["optimizer"]["state"]
        order = optimizer_order(family_parameter_names(self.config))
        by_name = {order[int(index)]: values for index, values in saved.items()}
        for part, optimizer in zip(self.parts, self.optimizers):
            for name, parameter in part.named_parameters():
                if name not in by_name:
                    continue
                _, region = local_region(parameter)
                state = {}
                for key, value in by_name[name].items():
                    if value.dim() == 0:
                        state[key] = value.clone()
                        continue
                    state[key] = torch.zeros_like(parameter)
                    local_region(state[key])[0].copy_(value[region])
                optimizer.state[parameter] = state

    def save(self, step: int, state: dict[str, Any]) -> Path:
        # The checkpoint's "layout" key holds the mesh's ranks per dimension (read by the trainer
        # to keep the global batch on resume); older checkpoints have it under that name.
        return self.checkpointer.save(self.parts, self.optimizers, step,
                                      dict(state, step=step, layout=self.parallel.dims()),
                                      self.train.checkpoint.keep)

    def poll(self) -> None:
        self.checkpointer.poll()

    def finish(self) -> Path | None:
        """End the process group, then export and link the family on rank 0 alone.

        Nothing collective remains while rank 0 exports, so however long the export takes,
        no rank can hit the collective timeout waiting for it.
        """
        self.checkpointer.wait()
        dist.barrier()
        dist.destroy_process_group()
        return publish_latest_family(self.train) if self.is_main else None

    # The step.

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for part in self.parts:
            yield from part.named_parameters()

    def freeze(self, patterns: list[str]) -> None:
        for part in self.parts:
            freeze(part, patterns)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizers, lr)

    def forward_backward(self, micro_batches, lambdas, distill, chunk_size) -> StepSums:
        counts = torch.tensor([sum(count_targets(b["labels"]) for b in micro_batches),
                               sum(b["input_ids"].numel() for b in micro_batches)], dtype=torch.float64)
        dist.all_reduce(counts)
        # Tensor and pipeline ranks hold copies of their data-parallel group's batch.
        copies = self.parallel.tp * self.parallel.pp
        targets, tokens = (int(v) // copies for v in counts.tolist())
        if not self.parallel.pp_enabled:
            model = self.parts[0]
            sync = accumulation_sync(model) if self.sharded else None
            sums = accumulate(model, micro_batches, lambdas, distill, chunk_size, targets, self.device,
                              self.autocast, sync)
        else:
            sums = self._pipeline_step(micro_batches, lambdas, distill, targets)
        if self.parallel.tp_enabled and not self.sharded:
            settle_partial_grads(p for _, p in self.named_parameters())
        # Tensor-parallel ranks record identical (replicated) losses.
        sums = sums.all_reduce().map(lambda total: total / self.parallel.tp)
        return as_sums(self.config, sums, lambdas, distill, targets, tokens)

    def _pipeline_step(self, micro_batches, lambdas, distill, targets) -> ExitSums[torch.Tensor]:
        input_ids = torch.cat([b["input_ids"] for b in micro_batches]).to(self.device)
        labels = torch.cat([b["labels"] for b in micro_batches])  # on the host (see `exit_loss_sum`)
        for part in self.parts:
            part.exit_weights, part.distill, part.global_targets = dict(lambdas), dict(distill), targets
        schedule = self._pipeline(*labels.shape, len(micro_batches))
        with autocast_context(self.device, self.autocast):
            if self.parts[0].is_first:
                schedule.step(input_ids, target=labels, labels=labels, return_outputs=False)
            else:
                schedule.step(target=labels, labels=labels, return_outputs=False)
        exits = self.config.exits
        sums = ExitSums.zeros(len(exits))
        for part in self.parts:
            for exit_layer, exit_sums in part.take_records():
                sums.add_(exits.index(exit_layer), exit_sums)
        return sums

    def _pipeline(self, batch: int, length: int, accumulation: int):
        """The schedule for (batch, length) inputs; built on first use with static stage shapes.

        Static shapes skip the stages' shape-inference pass, whose extra forward and
        backward would otherwise run (and record) the exit losses of one micro-batch twice.
        """
        p = self.parallel
        per_step = p.microbatches or self._num_stages
        count = per_step * accumulation
        if self._schedule_key == (batch, length, count):
            return self._schedule
        if batch % count:
            raise ConfigError(f"data.batch_size {batch // accumulation} on each data-parallel rank is not divisible "
                              f"by parallel.microbatches = {per_step}")
        local = length
        if p.sequence_parallel:
            if length % p.tp:
                raise ConfigError(f"data.seq_len {length} is not divisible by parallel.tp = {p.tp} (needed by "
                                  f"sequence_parallel)")
            local = length // p.tp
        rows = batch // count
        hidden = torch.empty(rows, local, self.config.hidden_size, dtype=self.activation_dtype,
                             device=self.device, requires_grad=True)
        tokens = torch.zeros(rows, length, dtype=torch.long, device=self.device)
        loss = torch.zeros((), dtype=torch.float32, device=self.device, requires_grad=True)
        group = self.mesh["pp"].get_group()
        stages = [SyncedStage(part, index, self._num_stages, self.device, group=group,
                              input_args=tokens if part.is_first else hidden,
                              output_args=loss if part.is_last else hidden, reshard=p.pp_reshard)
                  for part, index in zip(self.parts, self._stage_indices)]
        self._schedule = build_schedule(p.pp_schedule, stages, count)
        self._schedule_key = (batch, length, count)
        return self._schedule

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm over every rank and stage (one all-reduce, one host read);
        gradients scaled down to max_norm if given (`familial.parallel.norm`)."""
        grads = [p.grad for _, p in self.named_parameters() if p.grad is not None]
        return clip_grad_norm_(grads, max_norm, self.parallel.world_size // self.parallel.pp, self.device)

    def optimizer_step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    # Inspection (tests, benches).

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """{family FQN: full value} of this rank's parts (collective within each part's mesh)."""
        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
                for name, p in self.named_parameters()}

    def full_gradients(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.named_parameters():
            if p.grad is not None:
                out[name] = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().cpu().clone()
        return out


def check_shared_run_dir(run_dir: Path) -> None:
    """Every rank must see the run directory rank 0 sees: rank 0 writes the checkpoints'
    staging directory that every rank then writes its shards into, and reads back what all
    of them wrote. Rank 0 writes a random token; after a barrier each rank reads it, and a
    rank on another filesystem (a node-local run_dir) stops the run with a clear error
    before anything is trained."""
    tokens = [os.urandom(8).hex()]
    dist.broadcast_object_list(tokens, src=0)
    marker = run_dir / f".shared-{tokens[0]}"
    created = False
    if dist.get_rank() == 0:
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(tokens[0])
    dist.barrier()
    try:
        seen = marker.read_text() == tokens[0]
    except OSError:
        seen = False
    blind = torch.tensor([0 if seen else 1], dtype=torch.int64)
    missing = [torch.zeros_like(blind) for _ in range(dist.get_world_size())]
    dist.all_gather(missing, blind)
    dist.barrier()
    if dist.get_rank() == 0:
        # Nothing is left behind: the check writes no file a run has not written itself.
        marker.unlink(missing_ok=True)
        if created:
            run_dir.rmdir()
    ranks = [r for r, m in enumerate(missing) if int(m)]
    if ranks:
        raise ConfigError(f"run_dir {run_dir}: ranks {ranks} do not see what rank 0 writes there; every node "
                          f"needs the run directory on one shared filesystem (checkpoints are written into it by "
                          f"all ranks)")


def check_distillation(train: TrainConfig, config: FamilyConfig, parallel: ParallelConfig) -> None:
    """A distilled exit needs the deepest exit's logits: with a pipeline, only the last stage has them."""
    if parallel.pp == 1:
        return
    bounds = parallel.stage_boundaries or split_layers(config, parallel.pp * stages_per_rank(parallel.pp_schedule))
    for stage in train.resolved_stages():
        for key in stage.loss.distill:
            exit_layer = config.resolve_member(key)
            if exit_layer < bounds[-2]:
                raise ConfigError(f"train config: field 'loss.distill' key {key!r}: exit {exit_layer} lies before the "
                                  f"last pipeline stage (layers {bounds[-2]}..), but self-distillation needs the "
                                  f"deepest exit's logits, which only the last stage has; use pp = 1, or "
                                  f"stage_boundaries that put exit {exit_layer} on the last stage")
