"""`familial plot`: curves in depth order, the lambda panel only when a lambda changes."""

from __future__ import annotations

import json
import struct

from familial.cli import main
from familial.train.plot import series, smooth


def write_run(run, lambdas) -> None:
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as handle:
        for step in range(1, 41):
            # Logged shallow to deep, as the trainer does; the deep exit starts highest here.
            record = {"step": step, "loss": 9.0, "loss/tiny": 5 + 1 / step, "loss/small": 4.8 + 2 / step,
                      "loss/full": 4.6 + 4 / step}
            record.update({f"lambda/{name}": lambdas(name, step) for name in ("tiny", "small", "full")})
            handle.write(json.dumps(record) + "\n")


def png_size(path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_plot_keeps_depth_order_and_draws_lambdas_only_when_they_change(tmp_path, capsys):
    write_run(tmp_path / "constant", lambda name, step: 1.0)
    write_run(tmp_path / "decaying", lambda name, step: 1.0 if name == "full" else 1 - step / 50)
    records = [json.loads(line) for line in (tmp_path / "constant" / "metrics.jsonl").open()]
    assert list(series(records, "loss/")) == ["tiny", "small", "full"]
    for run in ("constant", "decaying"):
        assert main(["plot", str(tmp_path / run)]) == 0
    assert capsys.readouterr().out.count("loss.png") == 2
    constant, decaying = (png_size(tmp_path / run / "loss.png") for run in ("constant", "decaying"))
    assert constant[0] == decaying[0] and constant[1] < decaying[1]  # one panel fewer
    assert [p.name for p in (tmp_path / "constant").iterdir() if p.name.startswith(".")] == []


def test_smoothing_follows_the_trend_and_leaves_short_runs_alone():
    assert smooth([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    noisy = [5 + (-1) ** i for i in range(200)]
    assert max(smooth(noisy)[100:]) - min(smooth(noisy)[100:]) < 0.2


def test_metrics_without_per_exit_losses_are_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert main(["plot", str(tmp_path / "run")]) == 2
    assert "no per-exit losses" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.jsonl"]
