"""`familial demo --quick` end to end: data, joint training, evidence, DaE, export, samples."""

from __future__ import annotations

import json
import os
import re

import pytest

from familial.checkpoint_io import load_family
from familial.cli import main
from familial.commands.demo import choose_threads


def test_demo_quick_trains_measures_its_evidence_runs_dae_and_names_the_family(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--threads", "1", "--output", str(output)]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0].startswith("threads: 1 (--threads)")
    # Each training run's progress bar says which run it is.
    assert "DaE small:" in err and "healing small:" in err

    # The evidence table: every member with its loss, its gap to the bigram and to the
    # previous member, and its agreement with the full member, each with an interval.
    interval = r"[-+]?\d+\.\d+ \[[-+]?\d+\.\d+, [-+]?\d+\.\d+\]"
    rows = re.findall(rf"^(small|full)\s+(\d+)\s+({interval})\s+({interval})\s+(-|{interval})\s+\d", out, re.M)
    assert [(name, int(layers)) for name, layers, *_ in rows] == [("small", 2), ("full", 4)]
    assert rows[0][4] == "-" and rows[1][4] != "-"
    assert re.search(rf"^unigram \(add-one\)\s+{interval}$", out, re.M)
    assert re.search(rf"^bigram \(Kneser-Ney\)\s+{interval}$", out, re.M)
    # Each claim's verdict is the one its figures in evidence.json support.
    evidence = json.loads((output / "run" / "evidence.json").read_text())
    members, dae = evidence["family"]["members"], evidence["dae"]
    lowered = dae["change"]["trained"]["high"] < 0
    verdicts = {"every member below the bigram": all(m["minus_bigram"]["high"] < 0 for m in members),
                "each deeper member below the one before": all(m["minus_previous"]["high"] < 0 for m in members[1:]),
                "full member at least 5% below the smallest": evidence["family"]["full_below_smallest"]["low"] >= 0.05,
                "DaE lowered small's loss": lowered,
                "compression kept at least 90% of the gain": dae["gain_kept"]["value"] >= 0.9 if lowered else None}
    for claim, holds in verdicts.items():
        said = "- (no gain to keep)" if holds is None else "yes" if holds else "NO"
        assert re.search(rf"^{re.escape(claim)}.*: {re.escape(said)}", out, re.M), (claim, said)

    # DaE: expansion leaves the member exactly as it was; the table shows each state.
    assert re.search(r"^small \+ 1 zero blocks\s+3\s+[\d.]+M\s+" + interval + r"\s+\+0\.000 \[\+0\.000, \+0\.000\]",
                     out, re.M)
    for state in ("small before expansion", "small after DaE training", "small after SVD-LLM v2",
                  "small after 5 healing steps", "full (next member)"):
        assert state in out
    assert dae["added"] > dae["added_compressed"] > 0
    assert dae["parameters"]["expanded"] > dae["parameters"]["compressed"] > dae["parameters"]["before"]

    for name, layers in (("small", 2), ("full", 4)):
        config = json.loads((output / "members" / name / "config.json").read_text())
        assert config["num_hidden_layers"] == layers
        assert (output / "members" / name / "tokenizer.json").is_file()
    samples = (output / "run" / "samples.md").read_text()
    for label in ("### small", "### full", "### small + DaE, compressed"):
        assert label in samples

    # The last line names the trained family, which loads as it is.
    assert lines[-1] == f"trained family: {output / 'run' / 'family'}"
    assert load_family(output / "run" / "family").config.exits == [1, 3]
    records = [json.loads(line) for line in (output / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss/full"] < records[0]["loss/full"]


def test_demo_threads_leave_busy_cpus_alone(monkeypatch):
    monkeypatch.setattr("familial.commands.demo.pick_threads", lambda: (16, "16 core(s), other processes busy on 0.0"))
    assert choose_threads(None)[0] == 8
    monkeypatch.setattr("familial.commands.demo.pick_threads", lambda: (1, "2 core(s), other processes busy on 1.3"))
    assert choose_threads(None) == (1, "2 core(s), other processes busy on 1.3; --threads N to choose")
    monkeypatch.undo()
    threads, why = choose_threads(None)
    assert 1 <= threads <= os.cpu_count() and why
    assert choose_threads(3) == (3, "--threads")
    with pytest.raises(ValueError, match="--threads 0"):
        choose_threads(0)


def test_example_config_is_the_demo_recipe(tmp_path):
    from pathlib import Path

    from familial.demo.recipe import FULL, train_config
    from familial.train.config import load_config

    example = Path(__file__).parents[1] / "examples" / "demo" / "train.toml"
    data = tmp_path / "data"
    overrides = ["--run_dir", str(tmp_path / "run"), "--init.tokenizer", str(tmp_path / "tokenizer"),
                 "--data.sources.0.path", str(data / "train")]
    assert load_config(example, overrides) == load_config(
        data=train_config(FULL, data, tmp_path / "run", tmp_path / "tokenizer", seed=0))
