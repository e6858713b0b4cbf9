"""Atomic directory writes: output paths refused in one line, stale staging of dead writers
removed (a live writer's kept), modes that follow the umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from familial.staging import OutputPathError, atomic_directory, remove_stale, write_text_atomically


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_output_paths_that_cannot_be_directories_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    for target, message in ((tmp_path / "file", "is a file, not a directory"),
                            (tmp_path / "file" / "out", "because .*file is a file"),
                            (tmp_path / "file" / "a" / "b", "because .*file is a file")):
        with pytest.raises(OutputPathError, match=message):
            with atomic_directory(target, overwrite=True):
                pytest.fail("a refused target must not be staged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_stale_staging_of_dead_writers_is_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{dead_pid()}-abcd"
    legacy = tmp_path / ".out.tmp-k2j4h5g1"  # mkdtemp's name from before the pid was recorded
    live = tmp_path / f".out.tmp-{os.getppid()}-beef"
    other = tmp_path / f".outer.tmp-{dead_pid()}-abcd"  # another target's: not ours to remove
    for path in (dead, legacy, live, other):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert not dead.exists() and not legacy.exists() and live.exists() and other.exists()


def test_a_target_moved_aside_by_a_killed_overwrite_comes_back(tmp_path):
    target = tmp_path / "out"
    aside = tmp_path / f".out.old-{dead_pid()}-abcd"
    aside.mkdir()
    (aside / "a.txt").write_text("old")
    remove_stale(target)
    assert (target / "a.txt").read_text() == "old" and not aside.exists()


def test_modes_follow_the_umask(tmp_path):
    from familial.checkpoint_io import save_family
    from familial.config import FamilyConfig
    from familial.model import FamilyModel

    config = FamilyConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, exits=[0, 1])
    old = os.umask(0o027)
    try:
        family = save_family(FamilyModel(config), tmp_path / "family")
        note = write_text_atomically(tmp_path / "note.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(family.stat().st_mode) == 0o750
    for path in (family / "model.safetensors", family / "family.json", note):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
