"""Multi-process gloo runs of the parallel trainer against plain single-process training.

Each test launches `worker.py` under torchrun (2 or 4 CPU processes, a tiny family) and
checks what a user relies on: the first step's per-exit losses and gathered gradients
equal single-process training (relative 1e-5), and 10-step loss curves agree (1e-4).
A hung pipeline fails the test on a timeout instead of blocking CI.
"""

import json
import os
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from family_fixtures import family_config, make_family, optimizer_factory, reference_run

from familial.checkpoint_io import load_family
from familial.parallel.memory import state_bytes
from familial.train import dcp
from familial.train.config import ParallelConfig

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("worker.py")
STEPS = 10
# Exits 1 and 2 share stage 0 (1 inside it), exit 3 sits at the boundary: its branch reads
# stage 1's input, so its gradient must cross back into stage 0.
PLACED = {"num_hidden_layers": 6, "exits": [1, 2, 3, 5]}
PLACED_WEIGHTS = {1: 0.5, 2: 0.25, 3: 0.75, 5: 1.0}
TIMEOUT_S = 240


def run_layout(tmp_path: Path, nproc: int, spec: dict, fails: bool = False) -> list[dict] | str:
    out = tmp_path / "out"
    out.mkdir()
    spec = {"steps": STEPS, "family": {}, **spec, "out": str(out), "run_dir": str(tmp_path / "run")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(WORKER), json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{nproc}-process run {spec['parallel']} hung for {TIMEOUT_S}s:\n{output[-3000:]}")
    if fails:
        assert process.returncode != 0, output[-5000:]
        return output
    assert process.returncode == 0, output[-5000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


@cache
def _reference(family_json: str, weights_json: str, distill_json: str, batch: int):
    weights = {int(k): v for k, v in json.loads(weights_json).items()} or None
    distill = {int(k): v for k, v in json.loads(distill_json).items()} or None
    losses, grads, _, _, kds = reference_run(json.loads(family_json), STEPS, weights=weights, distill=distill,
                                             batch=batch)
    return losses, grads, kds


def reference(family: dict, weights: dict | None = None, distill: dict | None = None, batch: int = 4):
    """Per-step {exit: mean CE}, first-step gradients and per-step {exit: mean KL} of one process."""
    return _reference(json.dumps(family, sort_keys=True), json.dumps(weights or {}, sort_keys=True),
                      json.dumps(distill or {}, sort_keys=True), batch)


def accumulation_variants(rows_per_rank: int, data_parallel: int, steps: int = 3) -> list[dict]:
    """grad_accum 1, 2 and 4 over the same global batch (so one reference covers all three)."""
    return [{"grad_accum": n, "batch": 4 * rows_per_rank * data_parallel, "steps": steps} for n in (1, 2, 4)]


def assert_matches(results: list[dict], family: dict, weights: dict | None = None,
                   distill: dict | None = None, batch: int = 4) -> None:
    ref_losses, ref_grads, ref_kds = reference(family, weights, distill, batch)
    curves = [("losses", ref_losses)] + ([("kd", ref_kds)] if distill else [])
    for rank, result in enumerate(results):
        for key, want_curve in curves:
            first = result[key][0]
            for e, value in want_curve[0].items():
                assert abs(first[e] - value) <= 1e-5 * abs(value), (rank, key, e, first[e], value)
            for step, (got, want) in enumerate(zip(result[key], want_curve)):
                for e in want:
                    assert abs(got[e] - want[e]) <= 1e-4, (rank, key, step, e, got[e], want[e])
    grads = {}
    for result in results:
        grads.update(result["grads"])
    assert set(grads) == set(ref_grads)
    for name, want in ref_grads.items():
        error = (grads[name] - want).abs().max() / want.abs().max()
        assert error <= 1e-5, (name, float(error))


def test_tensor_parallel_with_sequence_parallel_distillation_selective_checkpointing_and_compile(tmp_path):
    # The vocabulary-sharded loss, chunked (7 rows at a time) like the unsharded one, with a
    # distilled exit; blocks checkpointed selectively and compiled: the single-process run's
    # losses, KL terms and gradients.
    results = run_layout(tmp_path, 2, {"parallel": {"tp": 2, "dp_shard": 1, "sequence_parallel": True},
                                       "train": {"activation_checkpointing": "selective", "compile": True},
                                       "chunk_size": 7, "distill": {1: 0.3}})
    assert_matches(results, {}, distill={1: 0.3})


def test_gradient_accumulation_keeps_activation_memory_flat_and_equals_one_big_batch(tmp_path):
    # FSDP over 2 ranks; 2 rows per rank per micro-batch, or the whole step's rows at once.
    variants = [{"batch": 8, "grad_accum": 2}, {"batch": 32, "grad_accum": 8}, {"batch": 32, "grad_accum": 1}]
    results = run_layout(tmp_path, 2, {"parallel": {"dp_shard": 2}, "steps": 1, "variants": variants})
    for few, many, big in results:
        few_peak, many_peak, big_peak = (r["peak_saved_bytes"][0] for r in (few, many, big))
        assert many_peak <= 1.1 * few_peak, (few_peak, many_peak)
        assert big_peak >= 3 * many_peak, (many_peak, big_peak)
        for name, grad in big["grads"].items():
            error = (many["grads"][name] - grad).abs().max() / grad.abs().max()
            assert error <= 1e-5, (name, float(error))


def assert_variants_match(results: list[list[dict]], variants: list[dict], family: dict,
                          weights: dict | None = None) -> None:
    for index, variant in enumerate(variants):
        assert_matches([rank[index] for rank in results], family, weights, batch=variant["batch"])


@pytest.mark.parametrize("layout", [{"dp_shard": 2}, {"dp_replicate": 2, "dp_shard": 1}])
def test_data_parallel_gradients_are_summed_over_ranks(tmp_path, layout):
    # dp_shard: FSDP2; dp_replicate: full replicas (HSDP with one shard per group). Each
    # micro-batch is reduce-scattered; HSDP's all-reduce waits for the last: grad_accum 1, 2
    # and 4 all give the one-process gradients.
    variants = accumulation_variants(1, 2)
    assert_variants_match(run_layout(tmp_path, 2, {"parallel": layout, "variants": variants}), variants, {})


@pytest.mark.parametrize("layout", [{"tp": 2, "dp_shard": 2}, {"dp_replicate": 2, "dp_shard": 2}],
                         ids=["tp x dp_shard", "hsdp"])
def test_four_ranks_in_two_dimensions_train_as_one_process(tmp_path, layout):
    # Tensor parallel inside FSDP, and true HSDP (two replicas, each sharded over two ranks);
    # four steps of the loss curves keep the 4-process runs short.
    results = run_layout(tmp_path, 4, {"parallel": layout, "steps": 4})
    assert_matches(results, {})
    assert_states_as_documented(results, {}, layout)


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B"])
def test_pipeline_exits_inside_at_boundary_and_shared_stage(tmp_path, schedule):
    # Exit 3, distilled from exit 5, shares the last stage with its teacher.
    results = run_layout(tmp_path, 2, {
        "parallel": {"pp": 2, "dp_shard": 1, "pp_schedule": schedule, "microbatches": 4,
                     "stage_boundaries": [0, 3, 6]},
        "family": PLACED, "weights": PLACED_WEIGHTS, "distill": {3: 0.2}, "chunk_size": 5})
    assert results[0]["boundaries"] == [0, 3, 6]
    assert_matches(results, PLACED, PLACED_WEIGHTS, distill={3: 0.2})


def test_interleaved_pipeline_with_cost_balanced_split(tmp_path):
    results = run_layout(tmp_path, 2, {
        "parallel": {"pp": 2, "dp_shard": 1, "pp_schedule": "Interleaved1F1B", "microbatches": 4},
        "family": PLACED, "weights": PLACED_WEIGHTS})
    # Four stages over two ranks; the exits' branches and heads weigh on the split.
    assert len(results[0]["boundaries"]) == 5
    assert_matches(results, PLACED, PLACED_WEIGHTS)


@pytest.mark.parametrize("layout", [{"tp": 2, "dp_shard": 2, "sequence_parallel": True},
                                    {"pp": 2, "tp": 2, "dp_shard": 1, "microbatches": 2}])
def test_clipping_is_one_all_reduce_and_one_host_read_and_the_loss_reads_nothing(tmp_path, layout):
    # Mixed meshes: weights sharded over (dp_shard, tp), norms over dp_shard alone or
    # replicated over tp; or two pipeline stages. The norm is the one-process gradients' norm.
    results = run_layout(tmp_path, 4, {"parallel": layout, "steps": 1, "count": True})
    _, ref_grads, _ = reference({})
    want = float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())))
    for result in results:
        clip = result["clip"]
        assert abs(clip["norm"] - want) <= 1e-5 * want, (clip["norm"], want)
        assert abs(clip["clipped_norm"] - want / 4) <= 1e-5 * want
        for key in ("collectives", "clip_collectives"):
            assert clip[key] == ["c10d.allreduce_.default"], clip[key]
        for key in ("host_reads", "clip_host_reads"):
            assert clip[key] == ["aten._local_scalar_dense.default on torch.float64 ()"], clip[key]
        if "pp" not in layout:
            # The tensor-parallel exit loss (and the whole step) reads no device data on the
            # host. (torch's pipeline schedule makes a few reads of its own per step.)
            assert result["step_host_reads"] == [], result["step_host_reads"]


def assert_states_as_documented(results: list[dict], family: dict, layout: dict) -> None:
    """Each rank holds the model-state bytes docs/parallel.md's arithmetic gives for its stage."""
    config, parallel = family_config(family), ParallelConfig(**layout).resolve(len(results))
    per_stage = state_bytes(config, parallel, results[0]["boundaries"])
    for rank, result in enumerate(results):
        want = per_stage[rank // (len(results) // parallel.pp)]
        assert abs(result["state_bytes"] - want) <= 0.01 * want, (rank, result["state_bytes"], want)


@pytest.mark.parametrize("reshard", [False, True])
def test_fsdp_with_pipeline(tmp_path, reshard):
    # Accumulation micro-batches become pipeline micro-batches, each reduce-scattered.
    layout = {"pp": 2, "dp_shard": 2, "pp_schedule": "1F1B", "microbatches": 2, "stage_boundaries": [0, 3, 6],
              "pp_reshard": reshard}
    variants = accumulation_variants(2, 2)
    results = run_layout(tmp_path, 4, {"parallel": layout, "family": PLACED, "weights": PLACED_WEIGHTS,
                                       "variants": variants})
    assert_variants_match(results, variants, PLACED, PLACED_WEIGHTS)
    assert_states_as_documented([rank[0] for rank in results], PLACED, layout)


def test_hsdp_accumulates_exactly(tmp_path):
    # Two replicas of two shards: partial sums stay sharded until the last micro-batch.
    variants = accumulation_variants(1, 4)
    results = run_layout(tmp_path, 4, {"parallel": {"dp_replicate": 2, "dp_shard": 2}, "variants": variants})
    assert_variants_match(results, variants, {})


def test_pipeline_with_tensor_parallel_resumes_in_one_process(tmp_path):
    saved_at = 5
    layout = {"pp": 2, "tp": 2, "dp_shard": 1, "pp_schedule": "1F1B", "microbatches": 2}
    results = run_layout(tmp_path, 4, {"parallel": layout, "save_at": saved_at})
    assert_matches(results, {})
    assert_states_as_documented(results, {}, layout)
    checkpoint = Path(results[0]["checkpoint"])
    assert checkpoint.name == "dcp-00000005"

    # Continue from the pp=2 x tp=2 checkpoint in one plain process: the single-process
    # trajectory goes on (weights and AdamW state both resharded by DCP).
    model = make_family({}, seed=1)
    optimizer = optimizer_factory(1e-3)(model)
    info = dcp.load(checkpoint, [model], [optimizer], no_dist=True)
    assert info["step"] == saved_at and info["layout"]["pp"] == 2 and info["layout"]["tp"] == 2
    resumed, *_ = reference_run({}, STEPS, model=model, optimizer=optimizer, skip=saved_at)
    ref_losses, *_ = reference({})
    for got, want in zip(resumed, ref_losses[saved_at:]):
        for e in want:
            assert abs(got[e] - want[e]) <= 1e-4, (e, got[e], want[e])

    # Export to a plain family checkpoint: exactly the weights the 4 ranks held at that step.
    family = load_family(dcp.export_family(checkpoint, tmp_path / "family"))
    held = {}
    for result in results:
        held.update(result["saved_parameters"])
    assert set(held) == set(family.state_dict())
    for name, tensor in family.state_dict().items():
        assert torch.equal(tensor, held[name]), name


def test_a_run_directory_not_shared_by_every_rank_is_refused_at_start(tmp_path):
    output = run_layout(tmp_path, 2, {"parallel": {"dp_shard": 2}, "steps": 1, "node_local_run_dir": True},
                        fails=True)
    assert "run_dir run: ranks [1] do not see what rank 0 writes there" in output, output[-3000:]
