"""Pipeline parallelism: split the trunk into stages by cost, build stages and a schedule.

An exit's branch, norm, head and loss live in the stage holding its exit layer (the branch
reads the hidden state entering that layer, so an exit at a stage's first layer reads the
stage's input). Its loss gradient enters that stage's backward (see `stage.py`), so the
stock `torch.distributed.pipelining` schedules run unchanged. Labels travel with each
micro-batch as a keyword argument of `step(...)`, which the schedule splits for every stage.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._backward import stage_backward
from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from familial.config import ConfigError, FamilyConfig
from familial.text import counted

# Full-backward schedules only. The zero-bubble schedules split backward into input and
# weight passes; on torch 2.13 that fails with the exit-loss autograd functions ("Can't
# detach views in-place") and, with those made copies, with the chunked head loss (its saved
# tensors are modified before the weight pass): both checked on gloo, both upstream issues.
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved1f1b": ScheduleInterleaved1F1B}
MULTI_STAGE = {"interleaved1f1b"}
ZERO_BUBBLE = {"interleavedzerobubble", "zbvzerobubble", "dualpipev", "zerobubble"}


def schedule_key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def layer_costs(config: FamilyConfig) -> list[float]:
    """Relative cost (matmul FLOPs per token) of each trunk layer with whatever lives at it."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
    layer = attention + 3 * hidden * config.intermediate_size
    head = hidden * config.vocab_size
    costs = [float(layer)] * config.num_hidden_layers
    for e in config.exits[:-1]:
        costs[e] += config.branch_depth(e) * layer + head
    costs[-1] += head
    return costs


def split_layers(config: FamilyConfig, num_stages: int) -> list[int]:
    """Stage boundaries [0, b1, ..., L] minimising the most expensive stage (contiguous layers)."""
    count = config.num_hidden_layers
    if not 1 <= num_stages <= count:
        raise ConfigError(f"{num_stages} pipeline stages need 1..{count} trunk layers each;"
                          f" the family has {counted(count, 'layer')}")
    costs = layer_costs(config)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: least max-stage cost putting layers [0, i) into s stages.
    best = [[inf] * (count + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (count + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, count + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds = [count]
    for s in range(num_stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    return bounds[::-1]


def check_boundaries(config: FamilyConfig, bounds: list[int]) -> None:
    count = config.num_hidden_layers
    if bounds[0] != 0 or bounds[-1] != count or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(f"pipeline stage boundaries {bounds}: expected increasing layer indices"
                          f" from 0 to {count}, every stage with at least one layer")
    if len(bounds) > 2:
        last_start = bounds[-2]
        if config.tie_word_embeddings:
            raise ConfigError("family config: field 'tie_word_embeddings' = True: the tied weight would"
                              " live in the first and the last pipeline stage; use pp = 1")
        if config.shared_head and any(e < last_start for e in config.exits):
            raise ConfigError("family config: field 'shared_head' = True: every exit would need the"
                              f" one head, but exits {[e for e in config.exits if e < last_start]} lie"
                              f" before the last stage (layers {last_start}..); use pp = 1")


class SyncedStage(PipelineStage):
    """A PipelineStage whose FSDP gradients are reduce-scattered after every micro-batch.

    torch's stage turns FSDP's gradient sync and reshard-after-backward off for every
    micro-batch but the last, so each rank would hold its whole stage's unsharded gradients
    (and weights) until the end of the step. Here each micro-batch's backward reduce-scatters
    as a plain FSDP backward does, so a rank holds its gradient shard plus one layer's
    unsharded gradients; HSDP's all-reduce across replicas still waits for the last
    micro-batch. With `reshard` (parallel.pp_reshard) the layers' gathered weights are freed
    after each micro-batch's backward too; without it the stage stays gathered for the step.
    The schedule's closing `perform_reduce_grad` then finds nothing left to reduce and
    reshards the stage.
    """

    def __init__(self, *args, reshard: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reshard = reshard

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        if backward_type != "full" or not isinstance(self.submod, FSDPModule):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        self.submod.set_is_last_backward(last_backward)
        self.submod.set_reshard_after_backward(self.reshard or last_backward)
        self.submod.set_requires_gradient_sync(True)
        self.submod.set_requires_all_reduce(last_backward)
        return stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"],
                              bwd_kwargs["input_values"]), None


def stage_indices(pp_rank: int, pp_size: int, stages_per_rank: int) -> list[int]:
    """Looped placement: rank r holds stages r, r + pp, r + 2 pp, ... (what interleaved schedules expect)."""
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def schedule_class(name: str) -> type:
    """The schedule named `name` (case, '-' and '_' ignored), or a clear error."""
    key = schedule_key(name)
    if key in ZERO_BUBBLE:
        raise ConfigError(f"parallel.pp_schedule = '{name}': zero-bubble schedules split backward into"
                          " input and weight passes, which breaks the exit-loss gradients on torch 2.13;"
                          " use GPipe, 1F1B or Interleaved1F1B")
    if key not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule = '{name}': expected one of GPipe, 1F1B, Interleaved1F1B")
    return SCHEDULES[key]


def build_schedule(name: str, stages: list[PipelineStage], microbatches: int):
    cls = schedule_class(name)

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The last stage already returns its micro-batch's weighted loss.
        return output

    if schedule_key(name) in MULTI_STAGE:
        return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    if len(stages) != 1:
        raise ConfigError(f"parallel.pp_schedule = '{name}' runs one stage per rank, got {len(stages)}")
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule_key(schedule) in MULTI_STAGE else 1
