"""Training checkpoints of either kind, the one finder of "the latest", pruning, RUN_DIR/family.

One process writes `step-N` checkpoints:

    RUN_DIR/checkpoints/step-00000020/
        family/          a family checkpoint (`familial export` works on it)
        optimizer.pt     AdamW state and the torch RNG state
        trainer.json     step, stage, data position, skipped-step count, python/numpy RNG
        manifest.json    sha256 of every file above, checked on load

A save killed half-way leaves only a hidden `.step-*.tmp-*` directory, which discovery
ignores, so the previous checkpoint stays the latest loadable one. A parallel run writes
`dcp-N` checkpoints (see `familial.train.dcp`). Either kind resumes under any layout:
`find_checkpoint` picks the newest of both, and `keep` counts both.

`RUN_DIR/family` is a relative symbolic link to the newest checkpoint's family, replaced
atomically (a new link renamed over the old one) before older checkpoints are pruned. A
link rather than a copy: the family of a 14B run is tens of GB, a rename is atomic, and a
relative link survives moving or copying the whole run directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from familial.checkpoint_io import (
    CheckpointError,
    atomic_directory,
    load_family,
    save_family,
    sha256_file,
)
from familial.config import FamilyConfig
from familial.model import FamilyModel

MANIFEST = "manifest.json"
PREFIX = "step-"
DCP_PREFIX = "dcp-"
TRAINER_STATE = "trainer.json"
FAMILY_LINK = "family"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": _to_lists(random.getstate()),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict[str, Any], torch_state: torch.Tensor) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def save_checkpoint(run_dir: str | Path, step: int, model: FamilyModel,
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    tokenizer: str | Path | None = None, keep: int = 2) -> Path:
    """Write step-N atomically (with its manifest), then drop all but the newest `keep`."""
    target = checkpoint_root(run_dir) / f"{PREFIX}{step:08d}"
    # Saves killed half-way leave hidden staging (or trash) directories: reclaim their space.
    for stale in checkpoint_root(run_dir).glob(f".{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(target, overwrite=True) as staging:
        save_family(model, staging / "family", tokenizer_source=tokenizer)
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
                   staging / "optimizer.pt")
        state = dict(trainer_state, step=step, rng=rng_state())
        (staging / "trainer.json").write_text(json.dumps(state) + "\n")
        _write_manifest(staging)
    publish_family(run_dir, target / "family")
    prune(run_dir, keep)
    return target


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def is_complete(path: Path) -> bool:
    """A renamed-into-place checkpoint of either kind (staging directories are hidden)."""
    name = path.name
    for prefix, marker in ((PREFIX, MANIFEST), (DCP_PREFIX, TRAINER_STATE)):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return path.is_dir() and (path / marker).is_file() and (
                prefix == PREFIX or (path / ".metadata").is_file())
    return False


def is_distributed(path: Path) -> bool:
    return path.name.startswith(DCP_PREFIX)


def prune(run_dir: str | Path, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints (both kinds), never leaving RUN_DIR/family dangling."""
    link = Path(run_dir) / FAMILY_LINK
    for old in list_checkpoints(run_dir)[:-keep]:
        if link.is_symlink() and (link.parent / os.readlink(link)).parent.name == old.name:
            link.unlink()
        shutil.rmtree(old, ignore_errors=True)


def publish_family(run_dir: str | Path, family_dir: Path) -> Path:
    """Point RUN_DIR/family at `family_dir` (a relative link, swapped in by one rename)."""
    run_dir = Path(run_dir)
    link = run_dir / FAMILY_LINK
    if link.exists() and not link.is_symlink():
        # A directory an earlier version exported there: the user's data, left alone.
        print(f"{link} is a directory, not the link to the latest family: left as it is; the latest family "
              f"is {family_dir}", flush=True)
        return family_dir
    for stale in run_dir.glob(f".{FAMILY_LINK}.link-*"):
        stale.unlink()
    temp = run_dir / f".{FAMILY_LINK}.link-{os.getpid()}"
    os.symlink(os.path.relpath(family_dir, run_dir), temp)
    os.replace(temp, link)
    return link


def _write_manifest(directory: Path) -> None:
    # save_family hashed the weight files it wrote (family.json lists them): reuse those
    # sums instead of reading the weights, tens of GB at the paper's scale, a second time.
    family = directory / "family"
    known = {str((family / name).relative_to(directory)): digest
             for name, digest in (FamilyConfig.load_checksums(family) or {}).items()}
    files = {name: known.get(name) or sha256_file(directory / name)
             for name in (str(p.relative_to(directory)) for p in sorted(directory.rglob("*")) if p.is_file())}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (both kinds), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=checkpoint_step)


def find_checkpoint(resume: str | Path, run_dir: str | Path) -> Path:
    """`latest` (or "" / "auto") -> the run's newest checkpoint of either kind; otherwise a path."""
    if str(resume) in ("", "latest", "auto"):
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"{checkpoint_root(run_dir)}: no checkpoint to resume from")
        return found[-1]
    path = Path(resume)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a training checkpoint (expected a complete {PREFIX}N directory with "
                              f"{MANIFEST}, or a {DCP_PREFIX}N directory with .metadata and {TRAINER_STATE})")
    return path


def trainer_state(path: Path) -> dict[str, Any]:
    """trainer.json of a checkpoint of either kind (a step-N one is verified first)."""
    if not is_distributed(path):
        verify(path)
    return json.loads((path / TRAINER_STATE).read_text())


def verify(directory: Path) -> None:
    """Check every file listed in the manifest against its sha256."""
    manifest = json.loads((directory / MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (the checkpoint is corrupt)")


def load_checkpoint(directory: str | Path) -> tuple[FamilyModel, dict[str, Any], dict[str, Any]]:
    """-> (model, optimizer state dict, trainer state); RNG states are restored in place."""
    directory = Path(directory)
    verify(directory)
    model = load_family(directory / "family")
    saved = torch.load(directory / "optimizer.pt", weights_only=True)
    state = json.loads((directory / "trainer.json").read_text())
    set_rng_state(state.pop("rng"), saved["torch_rng"])
    return model, saved["optimizer"], state
