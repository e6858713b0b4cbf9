"""Memory per GPU of a parallel config, as the code allocates it: model states and activations.

The arithmetic in docs/parallel.md comes from these functions; tests check them against
what the trainer actually holds at small scale (states: every local parameter, gradient
and AdamW moment after a step; activations: what autograd keeps per decoder block in each
checkpointing mode).

Model states: float32 weights + float32 gradients + two float32 AdamW moments = 16 bytes per
parameter, sharded over dp_shard; tensor parallelism also divides every matrix (its
q/k/v/gate/up/o/down/embedding/head) but not the RMSNorm weights, which each tp rank keeps
whole. One exception, measured: with tp > 1 and no FSDP, the embedding's gradient is whole
on every tp rank.

Activations kept per token per decoder block (elements, plus a few per-head scalars; h
hidden, q = heads x head_dim, kv = kv_heads x head_dim, i intermediate):
  none       6h + 4q + 4kv + 4i   (each RMSNorm's input, normalised input and output; q/k before
                                   and after their norms, attention's q, k, v and output, o's
                                   input; gate, SiLU and up outputs, down's input)
  selective  3h + 2q + 2kv + 2i   (the block input and every matmul and attention output)
  full       h                    (the block input; one block's activations are rebuilt in backward)
Tensor parallelism divides the q/kv/i terms by tp, sequence parallelism the h terms too.
"""

from __future__ import annotations

from itertools import pairwise

from familial.config import FamilyConfig
from familial.parallel.pipeline import split_layers
from familial.train.config import ParallelConfig

STATE_BYTES = 16  # float32 weight, gradient, and two AdamW moments


def layer_parameters(config: FamilyConfig) -> tuple[int, int]:
    """(matrix parameters, norm parameters) of one decoder layer."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size, 2 * h + 2 * d


def stage_parameters(config: FamilyConfig, start: int, stop: int) -> tuple[int, int]:
    """(matrix, norm) parameters of the pipeline stage holding trunk layers [start, stop)."""
    matrices, norms = layer_parameters(config)
    head = config.hidden_size * config.vocab_size
    layers = stop - start
    total_matrices, total_norms = layers * matrices, layers * norms
    if start == 0:
        total_matrices += head  # the embedding
    for e in config.exits[:-1]:
        if start <= e < stop:
            depth = config.branch_depth(e)
            total_matrices += depth * matrices + (0 if config.shared_head else head)
            total_norms += depth * norms + config.hidden_size
    if stop == config.num_hidden_layers:
        total_matrices += head
        total_norms += config.hidden_size
    return total_matrices, total_norms


def state_bytes(config: FamilyConfig, parallel: ParallelConfig, boundaries: list[int] | None = None) -> list[int]:
    """Model-state bytes per rank of each pipeline stage (weights, gradients, AdamW moments)."""
    bounds = boundaries or ([0, config.num_hidden_layers] if parallel.pp == 1 else split_layers(config, parallel.pp))
    out = []
    for start, stop in pairwise(bounds):
        matrices, norms = stage_parameters(config, start, stop)
        total = STATE_BYTES * (matrices / parallel.tp + norms) / parallel.dp_shard
        if start == 0 and parallel.tp > 1 and parallel.dp_shard == 1:
            # DTensor's embedding backward returns the gradient replicated: each tp rank holds
            # the whole float32 embedding gradient, not its vocabulary slice (FSDP re-shards it).
            total += 4 * config.vocab_size * config.hidden_size * (1 - 1 / parallel.tp)
        out.append(total)
    return out


def activation_elements(config: FamilyConfig, checkpointing: str, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Elements autograd keeps per token per decoder block (see the module docstring)."""
    h, d = config.hidden_size, config.head_dim
    q, kv, i = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
    split = tp if sequence_parallel else 1
    if checkpointing == "full":
        return h / split
    if checkpointing == "selective":
        return 3 * h / split + (2 * q + 2 * kv + 2 * i) / tp
    return 6 * h / split + (4 * q + 4 * kv + 4 * i) / tp


def activation_bytes_bf16(config: FamilyConfig, checkpointing: str, tp: int = 1, sequence_parallel: bool = False
                          ) -> float:
    """Bytes kept per token per block when computing in bf16 (FSDP's bf16 gather): two per element,
    except that an RMSNorm on bf16 input keeps its input upcast to float32 (none only)."""
    elements = activation_elements(config, checkpointing, tp, sequence_parallel)
    if checkpointing == "none":
        elements += 2 * config.hidden_size / (tp if sequence_parallel else 1)
    return 2 * elements


def _stage_blocks(config: FamilyConfig, start: int, stop: int) -> tuple[int, int, int]:
    """(decoder blocks, heads, embeddings) a stage holding trunk layers [start, stop) runs."""
    blocks = (stop - start) + sum(config.branch_depth(e) for e in config.exits[:-1] if start <= e < stop)
    heads = sum(1 for e in config.exits[:-1] if start <= e < stop and not config.shared_head) + \
        (stop == config.num_hidden_layers)
    return blocks, heads, int(start == 0)


def rank_peak(config: FamilyConfig, parallel: ParallelConfig, tokens: int, checkpointing: str, grad_accum: int = 1,
              compute_bytes: int = 2, device: str = "cuda", chunk: int = 1024,
              boundaries: list[int] | None = None) -> list[dict[str, float]]:
    """Every term one rank of each pipeline stage holds at its peak, in bytes, and their total.

    `tokens` per accumulation micro-batch per data-parallel rank (a pipeline splits them into
    `microbatches`); `compute_bytes` 2 for bf16, 4 for float32. Terms:
      params, optimizer, grads   float32 shards (16 bytes per local parameter / dp_shard)
      gathered_root  FSDP's root unit (embedding, norms, heads) in the compute dtype, gathered
                     from each micro-batch's forward to its root reduce-scatter
      gathered_layers  decoder layers gathered at once: the one in backward and the one
                     prefetched, or every layer of the stage under a pipeline without pp_reshard
      head_grads     the stage's heads' unsharded gradients (compute dtype), from the start of
                     each micro-batch's backward to the root's reduce-scatter
      root_reduce    at that reduce-scatter: the root's unsharded gradients and the float32
                     reduce-scatter input (plain FSDP frees the gathered root just before; a
                     pipeline without pp_reshard keeps it gathered until the last micro-batch)
      retained       FSDP keeps the latest reduce-scatter input until the next unit's: a
                     layer's, or under a pipeline the root's, which outlives its micro-batch
      activations    what autograd keeps per block (module docstring) for one micro-batch;
                     `in_flight` of them on the stage (1F1B: pp - stage, at most all)
      optimizer_temp AdamW's foreach temporaries on CUDA (one float32 copy of the shard)
    Peak = params + optimizer + max(backward, reduce, update) with
      backward = grads + gathered_root + gathered_layers + head_grads + retained
                 + in_flight x activations
      reduce   = grads + root_reduce (+ gathered_root and gathered_layers under a pipeline
                 without pp_reshard) + (in_flight - 1) x activations
      update   = grads + optimizer_temp.
    Gradient accumulation adds nothing: every micro-batch is reduce-scattered into the float32
    shard. Without FSDP, heads' gradients are the grads term itself.
    """
    bounds = boundaries or ([0, config.num_hidden_layers] if parallel.pp == 1 else split_layers(config, parallel.pp))
    t, d, c = parallel.tp, parallel.dp_shard, compute_bytes
    layer_matrices, layer_norms = layer_parameters(config)
    layer = layer_matrices / t + layer_norms
    per_pipeline_micro = tokens / (parallel.microbatches or parallel.pp) if parallel.pp > 1 else tokens
    micro_batches = (parallel.microbatches or parallel.pp) * grad_accum if parallel.pp > 1 else 1
    per_token = _activation_bytes(config, parallel, checkpointing, c)
    keeps_stage = parallel.pp > 1 and not parallel.pp_reshard
    out = []
    for index, (start, stop) in enumerate(pairwise(bounds)):
        matrices, norms = stage_parameters(config, start, stop)
        local = matrices / t + norms
        blocks, heads, _ = _stage_blocks(config, start, stop)
        terms = {"params": 4 * local / d, "optimizer": 8 * local / d, "grads": 4 * local / d}
        if start == 0 and t > 1 and parallel.dp == 1:
            terms["grads"] += 4 * config.vocab_size * config.hidden_size * (1 - 1 / t)
        terms.update(_fsdp_terms(config, parallel, c, root=local - blocks * layer, layer=layer, blocks=blocks,
                                 heads=heads))
        terms["activations"] = per_pipeline_micro * blocks * per_token
        terms["in_flight"] = min(parallel.pp - index, micro_batches)
        terms["optimizer_temp"] = 4 * local / d if device == "cuda" else 0.0
        terms["total"] = terms["params"] + terms["optimizer"] + _busiest_moment(terms, keeps_stage)
        out.append(terms)
    return out


def _activation_bytes(config: FamilyConfig, parallel: ParallelConfig, checkpointing: str, compute_bytes: int) -> float:
    """Bytes autograd keeps per token per block (bf16 without checkpointing keeps float32 norm inputs)."""
    if checkpointing == "none" and compute_bytes < 4:
        return activation_bytes_bf16(config, checkpointing, parallel.tp, parallel.sequence_parallel)
    return activation_elements(config, checkpointing, parallel.tp, parallel.sequence_parallel) * compute_bytes


def _fsdp_terms(config: FamilyConfig, parallel: ParallelConfig, c: int, root: float, layer: float, blocks: int,
                heads: int) -> dict[str, float]:
    """The terms only FSDP adds (`rank_peak`'s docstring), all 0 without data parallelism."""
    names = ("gathered_root", "gathered_layers", "head_grads", "root_reduce", "retained")
    if parallel.dp == 1:
        return dict.fromkeys(names, 0.0)
    keeps_stage = parallel.pp > 1 and not parallel.pp_reshard
    head = config.vocab_size * config.hidden_size / parallel.tp
    return {"gathered_root": c * root,
            "gathered_layers": c * layer * (blocks if keeps_stage else min(2, blocks)),
            "head_grads": c * heads * head,
            "root_reduce": (c + 4) * root,
            "retained": 4 * (root if parallel.pp > 1 else layer)}


def _busiest_moment(terms: dict[str, float], keeps_stage: bool) -> float:
    """The largest of backward, the root's reduce-scatter and the optimizer update, beyond the
    parameters and optimizer states (`rank_peak`'s docstring)."""
    in_flight = terms["in_flight"]
    backward = terms["grads"] + terms["gathered_root"] + terms["gathered_layers"] + terms["head_grads"] + \
        terms["retained"] + in_flight * terms["activations"]
    kept = terms["gathered_root"] + terms["gathered_layers"] if keeps_stage else 0.0
    reduce = terms["grads"] + terms["root_reduce"] + kept + (in_flight - 1) * terms["activations"]
    update = terms["grads"] + terms["optimizer_temp"]
    return max(backward, reduce, update)


H100_GB = 80.0
FITS_GB = 0.95 * H100_GB  # what the estimate leaves out: CUDA context, allocator fragmentation


def family_14b() -> FamilyConfig:
    return FamilyConfig(vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=8, head_dim=128, exits=[2, 21, 39])


def parallel_configs_14b() -> list[tuple[str, ParallelConfig]]:
    return [("dp_shard 8", ParallelConfig(dp_shard=8)),
            ("tp 2 x dp_shard 4", ParallelConfig(tp=2, dp_shard=4)),
            ("tp 2 (sp) x dp_shard 4", ParallelConfig(tp=2, dp_shard=4, sequence_parallel=True)),
            ("tp 4 (sp) x dp_shard 2", ParallelConfig(tp=4, dp_shard=2, sequence_parallel=True)),
            ("pp 2 x dp_shard 4", ParallelConfig(pp=2, dp_shard=4)),
            ("pp 2 x dp_shard 4, pp_reshard", ParallelConfig(pp=2, dp_shard=4, pp_reshard=True)),
            ("dp_shard 16", ParallelConfig(dp_shard=16)),
            ("dp_replicate 2 x dp_shard 8", ParallelConfig(dp_replicate=2, dp_shard=8)),
            ("tp 2 (sp) x dp_shard 8", ParallelConfig(tp=2, dp_shard=8, sequence_parallel=True)),
            ("pp 2 x dp_shard 8", ParallelConfig(pp=2, dp_shard=8)),
            ("pp 2 x dp_shard 8, pp_reshard", ParallelConfig(pp=2, dp_shard=8, pp_reshard=True))]


def main() -> None:
    """The 14B family per H100 (docs/parallel.md's table): one 4096-token sequence per
    micro-batch (per pipeline micro-batch under pp, microbatches = pp), bf16 over float32."""
    config, seq = family_14b(), 4096
    print("mesh | GPUs | AC | busiest stage | params+optimizer+grads | gathered root / layers | head grads | "
          "root reduce | activations (x in flight) | total GB | fits 80 GB")
    for name, parallel in parallel_configs_14b():
        for mode in ("selective", "full"):
            tokens = seq * (parallel.microbatches or parallel.pp) if parallel.pp > 1 else seq
            stages = rank_peak(config, parallel, tokens, mode, compute_bytes=2, device="cuda")
            index = max(range(len(stages)), key=lambda i: stages[i]["total"])
            t = {k: v / 1e9 for k, v in stages[index].items() if k != "in_flight"}
            fits = "yes" if t["total"] <= FITS_GB else "no"
            print(f"{name} | {parallel.world_size} | {mode} | {index} | "
                  f"{t['params'] + t['optimizer'] + t['grads']:.1f} | {t['gathered_root']:.1f} / "
                  f"{t['gathered_layers']:.1f} | {t['head_grads']:.1f} | {t['root_reduce']:.1f} | "
                  f"{t['activations']:.1f} (x{stages[index]['in_flight']}) | {t['total']:.1f} | {fits}")


if __name__ == "__main__":
    main()
