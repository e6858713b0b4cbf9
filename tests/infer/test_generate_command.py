"""`familial generate`: speculative statistics and the --dtype option."""

from __future__ import annotations

import re

import pytest

from familial.checkpoint_io import save_family
from familial.cli import main


def test_generate_speculative_reports_drafted_accepted_and_speed(family, tmp_path, capsys, greedy_reference):
    save_family(family, tmp_path / "family")
    assert main(["generate", str(tmp_path / "family"), "--prompt-ids", "1,2,3", "--greedy",
                 "--max-new-tokens", "12", "--speculative", "cascade"]) == 0
    out, err = capsys.readouterr()
    assert [int(t) for t in out.split()] == greedy_reference(family, [1, 2, 3], 5, 12)
    stats = re.search(r"speculative: (\d+) tokens drafted, (\d+) accepted \((\d+)% acceptance\), "
                      r"[\d.]+ tokens/s", err)
    assert stats and int(stats[1]) > 0 and int(stats[2]) <= int(stats[1])
    assert main(["generate", str(tmp_path / "family"), "--prompt-ids", "1,2,3", "--greedy",
                 "--max-new-tokens", "4"]) == 0
    assert "speculative" not in capsys.readouterr().err


def test_generate_in_bfloat16(family, tmp_path, capsys):
    save_family(family, tmp_path / "family")
    assert main(["generate", str(tmp_path / "family"), "--prompt-ids", "1,2,3", "--greedy",
                 "--max-new-tokens", "5", "--dtype", "bfloat16", "--member", "exit-1"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 5 and "finish: length" in err
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path / "family"), "--prompt-ids", "1", "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
