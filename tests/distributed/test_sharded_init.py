"""Meta-device initialisation: every rank allocates and reads only its shards, and the result is
bitwise the one-process model, from a random seed, a family checkpoint or an HF checkpoint."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_checkpoints import write_tiny_hf

from familial.checkpoint_io import family_parameter_names, save_family
from familial.config import FamilyConfig
from familial.model import FamilyModel

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("init_worker.py")
# ~190 MB of float32 weights: 4 x each rank's share at tp 2 x dp_shard 2.
BIG = {"vocab_size": 16384, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6,
       "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "exits": [1, 5]}
# The tiny HF checkpoint read as a family with exits 1, 3, 5.
HF = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "exits": [1, 3, 5]}
LAYOUT = {"tp": 2, "dp_shard": 2}


def family_names(fields: dict) -> dict:
    return family_parameter_names(FamilyConfig(**fields))


def launch(tmp_path: Path, runs: list[dict]) -> list[dict]:
    out = tmp_path / "out"
    out.mkdir()
    spec = {"runs": runs, "seed": 7, "out": str(out)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(WORKER),
               json.dumps(spec)]
    process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"init workers hung:\n{process.communicate()[0][-3000:]}")
    assert process.returncode == 0, output[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


def test_each_rank_holds_only_its_share_and_the_weights_equal_one_process(tmp_path):
    torch.manual_seed(0)
    family = save_family(FamilyModel(FamilyConfig(**BIG)), tmp_path / "family")
    hf = write_tiny_hf(tmp_path / "hf", dtype=torch.bfloat16, vocab_size=96)
    results = launch(tmp_path, [
        {"name": "random", "init": {"model": BIG}, "parallel": LAYOUT},
        {"name": "family", "init": {"family": str(family)}, "parallel": LAYOUT},
        {"name": "hf", "init": {"hf": str(hf), "exits": [1, 3, 5]}, "parallel": {"pp": 2, "tp": 2}},
    ])
    for name in ("random", "family"):
        family_bytes = results[0][name]["family_bytes"]
        for rank, result in enumerate(results):
            share = result[name]["local_bytes"]
            assert family_bytes >= 3.5 * share, (name, rank, family_bytes, share)
            # A rank that built or read the whole family would grow by all of it (4 shares);
            # the bound, halfway there, leaves room for the generator's and the reader's blocks
            # and allocator slack, however the allocator and the machine's load behave.
            bound = (share + family_bytes) / 2
            assert result[name]["growth"] < bound, (name, rank, result[name]["growth"] / 2**20, share / 2**20)
        assert results[0][name]["bitwise_equal"] and len(results[0][name]["held"]) == len(family_names(BIG)), name
    # A bf16 HF checkpoint read in place (no imported copy written) into float32 master weights,
    # each pipeline stage's part bitwise the one-process import's.
    assert all(result["hf"]["bitwise_equal"] for result in results)
    held = {name for result in results for name in result["hf"]["held"]}
    assert len(held) == len(family_names(HF))
    assert all(result["hf"]["dtypes"] == ["torch.float32"] for result in results)
    assert not (tmp_path / "out" / "run").exists()
    print("peak RSS growth per rank (MiB):", {name: [round(r[name]["growth"] / 2**20, 1) for r in results]
                                                for name in ("random", "family")},
          "share:", round(results[0]["random"]["local_bytes"] / 2**20, 1),
          "family:", round(results[0]["random"]["family_bytes"] / 2**20, 1))
