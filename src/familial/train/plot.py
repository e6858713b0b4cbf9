"""`familial plot RUN_DIR`: per-exit training loss curves (and lambdas) from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from familial.train.metrics import METRICS_NAME, read_metrics


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write a PNG of every exit's loss per step (top) and its lambda (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir / METRICS_NAME}: no metrics to plot (run `familial train` first)")
    output = Path(output) if output else run_dir / "loss.png"
    keys = sorted({k for r in records for k in r if k.startswith("loss/")},
                  key=lambda k: _exit_order(records, k))
    weights = sorted({k for r in records for k in r if k.startswith("lambda/")},
                     key=lambda k: _exit_order(records, k))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        top.plot(*zip(*points), label=key.split("/", 1)[1], linewidth=1.2)
    top.set_ylabel("cross-entropy (nats/token)")
    top.set_title(f"per-exit training loss: {run_dir.name}")
    top.legend()
    top.grid(alpha=0.3)
    for key in weights:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        bottom.plot(*zip(*points), label=key.split("/", 1)[1], linewidth=1.2)
    bottom.set_ylabel("lambda")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.tmp.png")
    figure.savefig(temp, dpi=110)
    plt.close(figure)
    temp.replace(output)
    return output


def _exit_order(records: list[dict], key: str) -> float:
    # Shallow exits first: order by their first logged loss, highest (shallowest) first.
    for record in records:
        if record.get(key) is not None:
            return -record[key]
    return 0.0
