"""`familial demo --quick` end to end: data, joint training, held-out table, export, samples."""

from __future__ import annotations

import json
import math
import re

from familial.cli import main


def test_demo_quick_trains_evaluates_exports_and_samples(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--threads", "1", "--output", str(output)]) == 0
    out = capsys.readouterr().out

    rows = re.findall(r"^(tiny|small|medium|full)\s+(\d+)\s+(\d+)\s+[\d.]+M\s+([\d.]+)\s+[\d.]+$", out, re.M)
    assert [(name, int(exit_layer), int(layers)) for name, exit_layer, layers, _ in rows] == [
        ("tiny", 1, 2), ("small", 3, 4), ("medium", 5, 6), ("full", 7, 8)]
    for *_, loss in rows:
        # Training moved every member well below the uniform guess over 2048 tokens.
        assert float(loss) < math.log(2048) - 0.5

    for name, _, layers, _ in rows:
        member = output / "members" / name
        config = json.loads((member / "config.json").read_text())
        assert config["num_hidden_layers"] == int(layers)
        assert (member / "model.safetensors").is_file() and (member / "tokenizer.json").is_file()
    for name in ("tiny", "small", "medium", "full"):
        assert f"--- {name} (exit" in out
    records = [json.loads(line) for line in (output / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss/full"] < records[0]["loss/full"]
