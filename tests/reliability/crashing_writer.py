"""`familial export | import` processes that SIGKILL themselves at a point they report: the
fault injector of the writer kill tests, run as a fork server (fork_server.py).

    python crashing_writer.py        # then, per line on stdin:
    {"point": "weights", "at": 2, "argv": ["export", "FAMILY", "OUT", "--all"], "log": "PREFIX"}

For each line a child runs `familial ARGV` (stdout to PREFIX.out, stderr to PREFIX.err);
the server prints `pid N`, then `exit CODE` (-9 when killed). `point` names where the child
dies, `at` which occurrence (1-based): `weights` with half of a safetensors file on disk,
`member` right after a member's directory is complete (export --all), `publish` right after
the staging directory is renamed to OUT, `swap` between an overwrite's two renames (the old
OUT moved aside, the new one not yet in place); "none" never. Before dying the child prints
`dying at POINT AT`, so a test knows the point was reached rather than guessing from time.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

import familial.checkpoint_io as io
import familial.staging as staging
from familial import cli
from fork_server import serve


def inject(point: str, at: int) -> None:
    calls = 0

    def die_after(owner, name, before_dying=lambda *a, **k: None, when=lambda *a, **k: True):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            nonlocal calls
            result = real(*args, **kwargs)
            if when(*args, **kwargs):
                calls += 1
                if calls == at:
                    before_dying(*args, **kwargs)
                    print(f"dying at {point} {at}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            return result
        setattr(owner, name, wrapper)

    def half(tensors, filename, **kwargs):
        path = Path(filename)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def publishes(src, dst):
        return Path(src).name.startswith(f".{Path(dst).name}.tmp-")

    def moves_aside(src, dst):
        return Path(dst).name.startswith(f".{Path(src).name}.old-")

    if point == "weights":
        die_after(io, "save_file", before_dying=half)
    elif point == "member":
        die_after(io, "_write_member")
    elif point == "publish":
        die_after(staging.os, "replace", when=publishes)
    elif point == "swap":
        die_after(staging.os, "replace", when=moves_aside)
    elif point != "none":
        raise ValueError(f"unknown point {point!r}")


def child(job: dict) -> int:
    inject(job["point"], job.get("at", 1))
    return cli.main(job["argv"])


if __name__ == "__main__":
    # The first random init of a meta tensor (every family load builds its model on the meta
    # device) loads torch's reference kernels for seconds: pay that once here, not per child.
    # A meta tensor holds no data, so no compute thread pool exists when the server forks.
    torch.empty(1, device="meta").normal_()
    serve(child)
