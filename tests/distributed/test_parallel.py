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
from functools import lru_cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from family_fixtures import make_family, optimizer_factory, reference_run  # noqa: E402

from familial.checkpoint_io import load_family  # noqa: E402
from familial.train import dcp  # noqa: E402

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("worker.py")
STEPS = 10
# Exits 1 and 2 share stage 0 (1 inside it), exit 3 sits at the boundary: its branch reads
# stage 1's input, so its gradient must cross back into stage 0.
PLACED = {"num_hidden_layers": 6, "exits": [1, 2, 3, 5]}
PLACED_WEIGHTS = {1: 0.5, 2: 0.25, 3: 0.75, 5: 1.0}
TIMEOUT_S = 240


def run_layout(tmp_path: Path, nproc: int, spec: dict) -> list[dict]:
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
    assert process.returncode == 0, output[-5000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


@lru_cache(maxsize=None)
def _reference(family_json: str, weights_json: str):
    weights = {int(k): v for k, v in json.loads(weights_json).items()} or None
    losses, grads, _, _ = reference_run(json.loads(family_json), STEPS, weights=weights)
    return losses, grads


def reference(family: dict, weights: dict | None = None):
    return _reference(json.dumps(family, sort_keys=True), json.dumps(weights or {}, sort_keys=True))


def assert_matches(results: list[dict], family: dict, weights: dict | None = None) -> None:
    ref_losses, ref_grads = reference(family, weights)
    for rank, result in enumerate(results):
        first = result["losses"][0]
        for e, value in ref_losses[0].items():
            assert abs(first[e] - value) <= 1e-5 * abs(value), (rank, e, first[e], value)
        for step, (got, want) in enumerate(zip(result["losses"], ref_losses)):
            for e in want:
                assert abs(got[e] - want[e]) <= 1e-4, (rank, step, e, got[e], want[e])
    grads = {}
    for result in results:
        grads.update(result["grads"])
    assert set(grads) == set(ref_grads)
    for name, want in ref_grads.items():
        error = (grads[name] - want).abs().max() / want.abs().max()
        assert error <= 1e-5, (name, float(error))


def test_tensor_parallel_with_sequence_parallel(tmp_path):
    results = run_layout(tmp_path, 2, {"parallel": {"tp": 2, "dp_shard": 1, "sequence_parallel": True}})
    assert_matches(results, {})


@pytest.mark.parametrize("layout", [{"dp_shard": 2}, {"dp_replicate": 2, "dp_shard": 1}])
def test_data_parallel_gradients_are_summed_over_ranks(tmp_path, layout):
    # dp_shard: FSDP2; dp_replicate: full replicas (HSDP with one shard per group).
    assert_matches(run_layout(tmp_path, 2, {"parallel": layout}), {})


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B"])
def test_pipeline_exits_inside_at_boundary_and_shared_stage(tmp_path, schedule):
    results = run_layout(tmp_path, 2, {
        "parallel": {"pp": 2, "dp_shard": 1, "pp_schedule": schedule, "microbatches": 4,
                     "stage_boundaries": [0, 3, 6]},
        "family": PLACED, "weights": PLACED_WEIGHTS})
    assert results[0]["boundaries"] == [0, 3, 6]
    assert_matches(results, PLACED, PLACED_WEIGHTS)


def test_interleaved_pipeline_with_cost_balanced_split(tmp_path):
    results = run_layout(tmp_path, 2, {
        "parallel": {"pp": 2, "dp_shard": 1, "pp_schedule": "Interleaved1F1B", "microbatches": 4},
        "family": PLACED, "weights": PLACED_WEIGHTS})
    # Four stages over two ranks; the exits' branches and heads weigh on the split.
    assert len(results[0]["boundaries"]) == 5
    assert_matches(results, PLACED, PLACED_WEIGHTS)


def test_fsdp_with_pipeline(tmp_path):
    results = run_layout(tmp_path, 4, {
        "parallel": {"pp": 2, "dp_shard": 2, "pp_schedule": "1F1B", "microbatches": 2,
                     "stage_boundaries": [0, 3, 6]},
        "family": PLACED, "weights": PLACED_WEIGHTS})
    assert_matches(results, PLACED, PLACED_WEIGHTS)


def test_pipeline_with_tensor_parallel_resumes_in_one_process(tmp_path):
    saved_at = 5
    results = run_layout(tmp_path, 4, {
        "parallel": {"pp": 2, "tp": 2, "dp_shard": 1, "pp_schedule": "1F1B", "microbatches": 2},
        "save_at": saved_at})
    assert_matches(results, {})
    checkpoint = Path(results[0]["checkpoint"])
    assert checkpoint.name == "dcp-00000005"

    # Continue from the pp=2 x tp=2 checkpoint in one plain process: the single-process
    # trajectory goes on (weights and AdamW state both resharded by DCP).
    model = make_family({}, seed=1)
    optimizer = optimizer_factory(1e-3)(model)
    info = dcp.load(checkpoint, [model], [optimizer], no_dist=True)
    assert info["step"] == saved_at and info["layout"]["pp"] == 2 and info["layout"]["tp"] == 2
    resumed, _, _, _ = reference_run({}, STEPS, model=model, optimizer=optimizer, skip=saved_at)
    ref_losses, _ = reference({})
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
