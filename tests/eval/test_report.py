"""`familial eval` then `familial report`: the JSON, the Markdown table and the charts agree."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from familial.cli import main
from familial.train.metrics import MetricsWriter

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluated(alphabet_family, alphabet_held_out, tmp_path_factory):
    """Run `familial eval` once on held-out alphabet text and a task file."""
    root = tmp_path_factory.mktemp("evaluated")
    task = root / "next_letter.jsonl"
    task.write_text(json.dumps({"context": "k l m", "choices": [" n", " q"], "answer": 0}) + "\n")
    out = root / "eval.json"
    code = main(["eval", str(alphabet_family), "--data", str(alphabet_held_out), "--seq-len", "32",
                 "--tasks", str(task), "--bootstrap", "200", "--prompt-tokens", "16",
                 "--decode-tokens", "4", "--runs", "1", "--threads", "1", "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text()), out, root


def test_eval_json_holds_every_member_with_quality_and_cost(evaluated):
    result, _, _ = evaluated
    members = result["members"]
    assert [m["name"] for m in members] == ["small", "full"]
    for m in members:
        assert m["perplexity"] == pytest.approx(np.exp(m["loss"]))
        assert m["loss_ci"][0] <= m["loss"] <= m["loss_ci"][1]
        assert m["tasks"]["next_letter"]["acc"] == 1.0
        assert m["prefill_ms"] > 0 and m["decode_ms_per_token"] > 0
    assert members[0]["flops_per_token"] < members[1]["flops_per_token"]
    assert members[1]["agreement"] == 1.0
    assert result["data"]["tokens"] == members[0]["tokens"]
    assert result["latency"]["threads"] == 1


def _table(markdown: str) -> dict[str, list[str]]:
    lines = markdown.split("## Members")[1].strip().split("\n\n")[0].splitlines()
    rows = [line.strip("|").split("|") for line in lines[2:]]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def test_report_renders_table_and_charts_from_the_eval_json(evaluated, alphabet_family, tmp_path):
    result, eval_json, _ = evaluated
    run = tmp_path / "run"
    writer = MetricsWriter(run, tensorboard=False)
    for step in range(1, 6):
        writer.write({"step": step, "loss": 4 / step, "loss/small": 5 / step, "loss/full": 3 / step,
                      "lambda/small": 1.0, "lambda/full": 1.0})
    writer.close()
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps([{"name": "dense-2L", "params": 60000, "loss": 1.0},
                                     {"name": "dense-4L", "flops_per_token": 2e5, "loss": 0.5}]))
    out = tmp_path / "report"
    assert main(["report", str(alphabet_family), "--eval", str(eval_json), "--run", str(run),
                 "--baselines", str(baselines), "--out", str(out)]) == 0
    for chart in ("pareto.png", "training_curves.png", "agreement.png"):
        data = (out / chart).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    markdown = (out / "report.md").read_text()
    for chart in ("pareto.png", "training_curves.png", "agreement.png"):
        assert f"]({chart})" in markdown
    table = _table(markdown)
    for m in result["members"]:
        cells = table[m["name"]]
        assert int(cells[1]) == m["exit"]
        loss, low, high = (float(x) for x in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cells[5]).groups())
        assert loss == pytest.approx(m["loss"], abs=5e-5)
        assert (low, high) == pytest.approx(m["loss_ci"], abs=5e-5)
        assert float(cells[6].split()[0]) == pytest.approx(m["loss_gap_to_full"], abs=5e-5)
        assert float(cells[7].split()[0]) == pytest.approx(m["perplexity"], abs=5e-4)
        assert float(cells[8].split()[0]) == pytest.approx(m["agreement"], abs=5e-5)
        assert float(cells[10]) == pytest.approx(m["decode_ms_per_token"], abs=5e-4)
    assert "next_letter acc" in markdown


def test_report_without_an_evaluation_shows_costs_only(alphabet_family, tmp_path):
    assert main(["report", str(alphabet_family), "--out", str(tmp_path / "r")]) == 0
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "No held-out loss" in markdown and not (tmp_path / "r" / "pareto.png").exists()
    assert _table(markdown)["small"][5] == "-"


def test_bad_baselines_and_mismatched_evaluations_are_named(evaluated, alphabet_family, tmp_path, capsys):
    _, eval_json, _ = evaluated
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps([{"name": "dense", "loss": 1.0}]))
    assert main(["report", str(alphabet_family), "--eval", str(eval_json), "--baselines",
                 str(baselines), "--out", str(tmp_path / "r")]) == 2
    assert "baseline 0 (dense): needs 'parameters' or 'flops_per_token'" in capsys.readouterr().err
    other = json.loads(eval_json.read_text())
    other["members"] = other["members"][:1]
    eval_json = tmp_path / "other.json"
    eval_json.write_text(json.dumps(other))
    assert main(["report", str(alphabet_family), "--eval", str(eval_json), "--out", str(tmp_path / "r")]) == 2
    assert "members have exits [1], but the family's exits are [1, 3]" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_report_title_names_the_run_not_the_directory_every_run_calls_family(tmp_path):
    from familial.eval.report import family_title

    assert family_title(tmp_path / "demo" / "checkpoints" / "step-00000300" / "family") == "demo, step 300"
    assert family_title(tmp_path / "demo" / "family") == "demo"
    assert family_title(tmp_path / "families" / "expanded") == "expanded"


def test_pareto_axes_show_counts_and_paired_differences(evaluated, alphabet_family):
    """Log axes labelled with each member's parameter count (not one decade tick), and a panel
    of the paired loss differences to the full member with their intervals."""
    from familial.config import FamilyConfig
    from familial.eval.report import _short_count, member_rows, pareto_figure, plt

    result, _, _ = evaluated
    rows = member_rows(FamilyConfig.load(alphabet_family), result)
    figure = pareto_figure(rows, [{"name": "dense", "parameters": 10**6, "loss": 1.0}])
    figure.canvas.draw()
    params, flops, gaps = figure.axes
    labels = [t.get_text() for t in params.get_xticklabels()]
    assert labels == [_short_count(r["parameters"]) for r in rows] + ["1M"], labels  # e.g. 110K
    assert [t.get_text() for t in gaps.get_yticklabels()] == ["small"]
    [bar] = gaps.containers
    low, high = rows[0]["loss_gap_to_full_ci"]
    segment = bar.lines[2][0].get_segments()[0]
    assert [x for x, _ in segment] == pytest.approx([low, high])
    plt.close(figure)
