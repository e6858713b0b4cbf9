"""`familial train` under torchrun where one rank SIGKILLs itself at a chosen step.

    torchrun --nproc-per-node 2 dying_rank.py '{"rank": 1, "step": 4}' CONFIG.toml [--resume]

The rank dies inside the step's forward/backward (the other rank is then blocked in a
collective, as after a real crash or lost node). Every rank prints which checkpoint it
resumed from. '{}' kills nothing. With "attempt": N it dies only in torchrun's N-th start
(TORCHELASTIC_RESTART_COUNT), so a run under `--max-restarts` dies once and then finishes.
"""

import json
import os
import signal
import sys

import torch.distributed as dist

from familial import cli
from familial.parallel.layout import ParallelLayout


def main() -> int:
    spec = json.loads(sys.argv[1])
    real_step, real_load = ParallelLayout.forward_backward, ParallelLayout.load
    calls = 0

    def forward_backward(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if dist.get_rank() == spec.get("rank") and calls == spec.get("step") and \
                attempt == spec.get("attempt", attempt):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, *args, **kwargs)

    def load(self, checkpoint):
        print(f"rank {dist.get_rank()} resumed from {checkpoint}", flush=True)
        return real_load(self, checkpoint)

    ParallelLayout.forward_backward = forward_backward
    ParallelLayout.load = load
    return cli.main(["train", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
