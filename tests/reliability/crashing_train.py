"""`familial train` processes that SIGKILL themselves at a chosen point: the crash tests'
fault injector, run as a fork server (fork_server.py).

    python crashing_train.py        # then, per line on stdin:
    {"point": "weights", "at": 2, "argv": ["CONFIG.toml", "--resume"], "log": "PREFIX"}

For each line a child runs `familial train ARGV` (stdout to PREFIX.out, stderr to
PREFIX.err); the server prints `pid N`, then `exit CODE` (-9 when killed). `point`
names where the child dies, `at` which occurrence (1-based): during a training step (after
backward, before the update), half-way through a checkpoint's weights, optimizer state or
manifest, right after a checkpoint is renamed into place (before older ones are pruned),
half-way through pruning, or half-way through a metrics line; "none" never. "external"
never dies by itself: the test kills it from outside at a random moment, and so that the
kill always lands on a running process, the child holds (sleeps until killed) once it has
saved `at` checkpoints. SIGKILL gives the process no chance to clean up, exactly like
`kill -9`. The child prints `start step N` (where training starts or resumes) and
`saved step N` after each checkpoint save returns.
The server itself runs no torch operation, so no thread pool exists when it forks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import familial.checkpoint_io as io
from familial import cli
from familial.train import checkpoint as ckpt
from familial.train import forward_backward, loop
from familial.train.metrics import MetricsWriter
from fork_server import serve


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def truncate(path: Path) -> None:
    path = Path(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def inject(point: str, at: int) -> None:
    calls = 0

    def nth() -> bool:
        nonlocal calls
        calls += 1
        return calls == at

    def wrap(owner, name, before=None, after=None, when=lambda *a, **k: True):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if when(*args, **kwargs) and nth():
                if before:
                    before(*args, **kwargs)
                else:
                    result = real(*args, **kwargs)
                    after(*args, **kwargs)
                    return result
            return real(*args, **kwargs)
        setattr(owner, name, wrapper)

    if point == "step":
        wrap(forward_backward, "family_loss_sums", after=lambda *a, **k: die())
    elif point == "weights":
        wrap(io, "save_file", after=lambda tensors, filename, **k: (truncate(filename), die()))
    elif point == "optimizer":
        wrap(ckpt.torch, "save", after=lambda obj, f, **k: (truncate(f), die()))
    elif point == "manifest":
        wrap(ckpt, "_write_manifest", after=lambda d: (truncate(Path(d) / ckpt.MANIFEST), die()))
    elif point == "rename":
        wrap(io.os, "replace", after=lambda src, dst: die(),
             when=lambda src, dst: Path(dst).name.startswith(ckpt.PREFIX))
    elif point == "prune":
        def half_removed(path, **kwargs):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for file in files[: len(files) // 2]:
                file.unlink()
            die()
        wrap(ckpt.shutil, "rmtree", before=half_removed,
             when=lambda path, **k: Path(path).name.startswith(ckpt.PREFIX))
    elif point == "metrics":
        def torn(self, record):
            self.handle.write(json.dumps(record)[:25])
            self.handle.flush()
            die()
        wrap(MetricsWriter, "write", before=torn)
    elif point == "external":
        def hold(*args, **kwargs):
            print("holding", flush=True)
            while True:
                signal.pause()
        wrap(ckpt, "save_checkpoint", after=hold)
    elif point != "none":
        raise ValueError(f"unknown point {point!r}")


def child(job: dict) -> int:
    import torch

    torch.set_num_threads(1)
    inject(job["point"], job.get("at", 1))
    real_run, real_save = loop.Trainer.run, ckpt.save_checkpoint

    def run(self, *args, **kwargs):
        print(f"start step {self.state.step}", flush=True)
        return real_run(self, *args, **kwargs)

    def save(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        print(f"saved step {step}", flush=True)
        return path
    loop.Trainer.run, ckpt.save_checkpoint = run, save
    return cli.main(["train", *job["argv"]])


if __name__ == "__main__":
    serve(child)
