"""The `familial` command line for import, info and export, as a user runs it."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from familial.checkpoint_io import load_family
from familial.cli import main


def test_import_info_export(tiny_hf, tmp_path, capsys):
    family = tmp_path / "family"
    assert main(["import", str(tiny_hf), str(family), "--exits", "1,3,5",
                 "--names", "device=1,edge=3"]) == 0
    capsys.readouterr()
    assert main(["info", str(family), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [m["layers"] for m in info["members"]] == [2, 4, 6]
    assert info["saved_bytes"] == info["separate_bytes"] - info["family_bytes"] > 0
    assert info["family_parameters"] == sum(p.numel() for p in load_family(family).parameters())

    assert main(["export", str(family), str(tmp_path / "all"), "--all"]) == 0
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "all" / "edge", dtype=torch.float32)
    assert stock.config.num_hidden_layers == 4


def test_errors_are_reported_not_raised(tiny_hf, tmp_path, capsys):
    assert main(["import", str(tiny_hf), str(tmp_path / "f"), "--exits", "1,9"]) == 2
    assert "exit 9 is outside the trunk" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
