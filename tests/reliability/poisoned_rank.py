"""`familial train`, under torchrun or alone, with one rank's gradient made non-finite at chosen steps.

    torchrun --nproc-per-node 2 poisoned_rank.py '{"rank": 1, "steps": [3]}' CONFIG.toml

On rank `rank` at each step in `steps` (1-based), one of the rank's own weights gets an
infinite gradient. Every rank prints, per step, whether the update was skipped and whether
any of its own weights changed.
"""

import json
import math
import sys

import torch
import torch.distributed as dist

from familial import cli
from familial.train import loop


def main() -> int:
    spec = json.loads(sys.argv[1])
    real = loop.train_step
    steps = 0

    def train_step(layout, *args, **kwargs):
        nonlocal steps
        steps += 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        weights = [p for _, p in layout.named_parameters()]
        before = [w.detach().clone() for w in weights]
        poisoned = rank == spec["rank"] and steps in spec["steps"]
        handles = [weights[-1].register_hook(lambda grad: grad * math.inf)] if poisoned else []
        try:
            result = real(layout, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        changed = any(not torch.equal(b, w.detach()) for b, w in zip(before, weights))
        print(f"rank {rank} step {steps}: skipped {result.skipped}, weights changed {changed}", flush=True)
        return result

    loop.train_step = train_step
    return cli.main(["train", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
