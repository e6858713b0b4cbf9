"""The serving code and the commands stay readable: no function in familial.infer,
familial.serve or familial.commands above cyclomatic complexity 20 (radon's grade D and
worse), so a step of the engine, or of a command, reads as named steps."""

from pathlib import Path

import pytest

radon = pytest.importorskip("radon.complexity", reason="radon (the test extra) measures complexity")

SOURCE = Path(__file__).resolve().parents[1] / "src" / "familial"
LIMIT = 20


@pytest.mark.parametrize("package", ["infer", "serve", "commands"])
def test_no_function_above_complexity_limit(package):
    too_complex = []
    for path in sorted((SOURCE / package).glob("*.py")):
        for block in radon.cc_visit(path.read_text()):
            if block.complexity > LIMIT:
                too_complex.append(f"{path.name}:{block.lineno} {block.fullname} ({block.complexity})")
    assert not too_complex, f"above cyclomatic complexity {LIMIT}: {', '.join(too_complex)}"
