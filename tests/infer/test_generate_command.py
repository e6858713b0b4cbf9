"""`familial generate`: speculative statistics, the --dtype option, and adaptive exit by --budget and --target."""

from __future__ import annotations

import re

import pytest

from familial.checkpoint_io import save_family
from familial.cli import main
from familial.infer.calibrate import write_early_exit


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


def _exits(out: str) -> tuple[list[int], list[int]]:
    """--show-exits output without a tokenizer: 'id [exit]' per token."""
    pairs = re.findall(r"(\d+) \[(\d+)\]", out)
    return [int(t) for t, _ in pairs], [int(e) for _, e in pairs]


def test_generate_with_a_budget_keeps_the_running_depth_under_it(family, tmp_path, capsys):
    save_family(family, tmp_path / "family")
    command = ["generate", str(tmp_path / "family"), "--prompt-ids", "1,2,3", "--greedy", "--max-new-tokens", "12",
               "--member", "auto", "--show-exits"]
    assert main(command) == 0
    _, free = _exits(capsys.readouterr().out)
    layers = family.config.member_layers
    cap = 0.5 * family.config.num_hidden_layers
    assert sum(map(layers, free)) / len(free) > cap  # without a budget the tokens go deeper
    assert main(command + ["--budget", "0.5"]) == 0
    out, err = capsys.readouterr()
    _, exits = _exits(out)
    assert len(exits) == 12 and set(exits) <= set(family.config.exits)
    depths = [layers(e) for e in exits]
    assert all(sum(depths[:n]) / n <= cap for n in range(1, 13)), depths
    assert f"mean depth {sum(depths) / 12:.1f} layers" in err


def test_generate_with_a_target_decodes_at_the_calibrated_point(family, tmp_path, capsys, greedy_reference):
    directory = save_family(family, tmp_path / "family")
    command = ["generate", str(directory), "--prompt-ids", "1,2,3", "--greedy", "--max-new-tokens", "12",
               "--show-exits", "--target"]
    assert main(command + ["0.9"]) == 2
    assert "no calibrated operating points" in capsys.readouterr().err
    # Calibrated points, conservative first: every exit off; every token leaving at exit 3 (a
    # top-1 probability is never below 0); every token leaving at exit 1.
    write_early_exit(directory, {"metric": "top1", "thresholds": {"1": 1.0, "3": 1.0}, "points": [
        {"lower_bound": 0.99, "thresholds": {"1": 1.0, "3": 1.0}},
        {"lower_bound": 0.8, "thresholds": {"1": 1.0, "3": 0.0}},
        {"lower_bound": 0.6, "thresholds": {"1": 0.0, "3": 0.0}}]})
    for target, exit_layer in (("1.0", 5), ("0.95", 5), ("0.7", 3), ("0.6", 1), ("0.1", 1)):
        assert main(command + [target]) == 0
        tokens, exits = _exits(capsys.readouterr().out)
        assert exits == [exit_layer] * 12, target
        assert tokens == greedy_reference(family, [1, 2, 3], exit_layer, 12), target
