"""kill -9 of `familial export --all` (and import) at the points a writer passes through:
OUT is absent or complete, never partial; the rerun works and leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from faults import leftovers, tiny_family
from familial.checkpoint_io import export_all, save_family

INJECTOR = Path(__file__).with_name("crashing_writer.py")


class Writers:
    """The fork server of crashing_writer.py: one `familial ...` child per trial."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.count = logs, 0
        self.server = subprocess.Popen([sys.executable, str(INJECTOR)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], point: str = "none", at: int = 1) -> tuple[int, str, str]:
        """-> (exit code, stdout, stderr) of one child."""
        self.count += 1
        log = self.logs / f"trial-{self.count}"
        job = {"point": point, "at": at, "log": str(log), "argv": [str(a) for a in argv]}
        self.server.stdin.write(json.dumps(job) + "\n")
        self.server.stdin.flush()
        self.server.stdout.readline()          # pid N
        code = int(self.server.stdout.readline().split()[1])
        return code, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    family = save_family(tiny_family(exits=[1, 2, 3], member_names={"small": 1}), root / "family")
    reference = root / "reference"
    export_all(family, reference)
    logs = root / "logs"
    logs.mkdir()
    writers = Writers(logs)
    yield writers, family, reference
    writers.close()


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# Where export --all dies: half-way through the first member's weights, half-way through the
# last member's (two complete members staged), after the second member's directory is
# complete, and right after the finished OUT is renamed into place.
@pytest.mark.parametrize("point, at, published", [("weights", 1, False), ("weights", 3, False),
                                                   ("member", 2, False), ("publish", 1, True)])
def test_killed_export_all_leaves_no_out_or_a_complete_one(setup, tmp_path, point, at, published):
    writers, family, reference = setup
    out = tmp_path / "members"
    code, stdout, stderr = writers.run(["export", family, out, "--all"], point, at)
    assert code == -9 and f"dying at {point} {at}" in stdout, stderr
    if published:
        assert tree(out) == tree(reference)
    else:
        assert not out.exists()
        assert leftovers(tmp_path), "the kill should have left a staging directory"

    code, _, stderr = writers.run(["export", family, out, "--all", "--overwrite"])
    assert code == 0, stderr
    assert tree(out) == tree(reference)
    assert sorted(p.name for p in out.iterdir()) == ["exit-2", "exit-3", "small"]
    assert leftovers(tmp_path) == []


def test_kill_between_the_renames_of_an_overwrite_keeps_the_old_out(setup, tmp_path):
    writers, family, reference = setup
    out = tmp_path / "members"
    export_all(family, out)
    (out / "small" / "notes.txt").write_text("the old OUT")
    code, stdout, stderr = writers.run(["export", family, out, "--all", "--overwrite"], "swap")
    assert code == -9 and "dying at swap 1" in stdout, stderr
    assert not out.exists()  # moved aside; the new one not yet in place

    # The next writer puts the old OUT back (and, without --overwrite, refuses to touch it).
    code, _, stderr = writers.run(["export", family, out, "--all"])
    assert code == 2 and "already exists" in stderr and len(stderr.strip().splitlines()) == 1
    assert (out / "small" / "notes.txt").read_text() == "the old OUT"
    assert leftovers(tmp_path) == []


def test_killed_import_is_cleaned_up_by_the_rerun(setup, tmp_path):
    writers, _, reference = setup
    out = tmp_path / "imported"
    argv = ["import", reference / "exit-3", out, "--exits", "1,3"]
    code, stdout, stderr = writers.run(argv, "weights")
    assert code == -9 and "dying at weights 1" in stdout, stderr
    assert not out.exists() and leftovers(tmp_path)
    code, _, stderr = writers.run(argv)
    assert code == 0, stderr
    assert leftovers(tmp_path) == []
    code, stdout, stderr = writers.run(["verify", out])
    assert code == 0 and "sha256 of 1 tensor file(s) match" in stdout, stderr
