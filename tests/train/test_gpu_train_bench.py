"""bench/gpu_train.py runs the trainer's step to its JSON line on whatever device there is (CPU in CI),
and the FLOPs behind its MFU are the FLOPs the step runs."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from familial.train.config import InitConfig, LRConfig, TrainConfig
from familial.train.init import RandomInit
from familial.train.layout import LocalLayout

BENCH = Path(__file__).parents[2] / "bench" / "gpu_train.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("gpu_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)  # past the run's own limit, which shows its output
def test_quick_run_reaches_its_json_line():
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    tiny = figures["families"]["tiny"]
    assert figures["bench"] == "gpu_train" and figures["measured_peak_tflops"] > 0
    # MFU is a ratio of two short timings on a shared machine: only its sign and finiteness are
    # load-independent; its numerator is checked against torch's FLOP counter below.
    mfu = tiny["mfu_vs_measured_peak"]
    assert tiny["tokens_per_s"] > 0 and math.isfinite(mfu) and mfu > 0
    assert tiny["speedup_one_pass_vs_per_member"] > 0


def test_step_flops_equal_what_torch_counts_for_one_joint_step():
    """The MFU's numerator: bench's FLOP model of one joint forward-backward against torch's
    FlopCounterMode over the same step (math attention, so the scores are matmuls it counts;
    no activation checkpointing, whose recomputation the model leaves out, as it leaves out the
    shallower exits' logits recomputed in backward)."""
    bench = bench_module()
    config, rows, length = bench.families(True)["tiny"]
    train = TrainConfig(init=InitConfig(model=config), device="cpu", precision="fp32",
                        activation_checkpointing="none", lr=LRConfig(lr=1e-5))
    layout = LocalLayout(train, config)
    layout.load_weights(RandomInit(config, 0))
    tokens = torch.randint(0, config.vocab_size, (rows, length + 1))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].contiguous()}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        layout.forward_backward([batch], {e: 1.0 for e in config.exits}, {}, 4096)
    # The shallower exits recompute their logits in backward (no head gradient kept alive
    # between forward and backward); MFU counts model FLOPs, not that recomputation.
    recomputed = (len(config.exits) - 1) * 2 * rows * length * config.hidden_size * config.vocab_size
    assert counter.get_total_flops() == bench.step_flops(config, rows * length, length) + recomputed


def test_the_14b_slice_gives_its_heads_the_family_share_of_the_flops():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_train", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from familial.config import FamilyConfig

    family = FamilyConfig(**bench.FAMILY_14B)
    piece = bench.families(False)["14b_slice"][0]
    assert abs(bench.head_share(piece) - bench.head_share(family)) < 0.002
    assert round(bench.head_share(family), 3) == 0.144  # 3 heads among 42 blocks
