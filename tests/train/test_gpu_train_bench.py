"""bench/gpu_train.py runs the trainer's step to its JSON line on whatever device there is (CPU in CI)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench" / "gpu_train.py"


def test_quick_run_reaches_its_json_line():
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    tiny = figures["families"]["tiny"]
    assert figures["bench"] == "gpu_train" and figures["measured_peak_tflops"] > 0
    assert tiny["tokens_per_s"] > 0 and 0 < tiny["mfu_vs_measured_peak"] < 1.5
    assert tiny["speedup_one_pass_vs_per_member"] > 0


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
