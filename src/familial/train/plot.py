"""`familial plot RUN_DIR`: per-exit training loss curves (and lambdas) from metrics.jsonl.

Panels a reader takes in at a glance: the smoothed loss of every exit, one colour per exit
from shallow (light) to deep (dark), raw values faint behind, legend in depth order, the y
axis spanning the curves after their first tenth (where the exits separate); below it each
exit's smoothed gap to the deepest exit, the quantity the family trades for its savings;
and the loss weights only if some lambda changes during the run (constant ones are named).
"""

from __future__ import annotations

from pathlib import Path

from familial.train.metrics import METRICS_NAME, read_metrics


def series(records: list[dict], prefix: str) -> dict[str, list[tuple[int, float]]]:
    """name -> [(step, value)] for keys `prefix<name>`, in the order the trainer logs them
    (its exits' order: shallow to deep)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix) and value is not None and "step" in record:
                out.setdefault(key[len(prefix):], []).append((record["step"], value))
    return out


def smooth(values: list[float]) -> list[float]:
    """Exponential moving average over about a tenth of the run (none for short runs)."""
    alpha = 2 / (max(1, len(values) // 10) + 1)
    out, average = [], None
    for value in values:
        average = value if average is None else alpha * value + (1 - alpha) * average
        out.append(average)
    return out


def draw_training(records: list[dict], file: Path, title: str) -> bool:
    """Write the training-curve PNG; False when the records hold no per-exit loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = series(records, "loss/")
    if not losses:
        return False
    lambdas = series(records, "lambda/")
    changing = {n: p for n, p in lambdas.items() if len({v for _, v in p}) > 1}
    constant = {n: p[0][1] for n, p in lambdas.items() if n not in changing}
    heights = [3, 1.6] + ([1.2] if changing else []) if len(losses) > 1 else [3]
    figure, axes = plt.subplots(len(heights), 1, figsize=(8, 1.6 * sum(heights) + 0.6),
                                sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})
    axes = [row[0] for row in axes]
    colours = dict(zip(losses, plt.get_cmap("viridis_r")(
        [0.15 + 0.7 * i / max(1, len(losses) - 1) for i in range(len(losses))])))
    note = ("; loss weights constant: " + _named_values(constant) if constant and not changing else "")
    _draw_losses(axes[0], losses, colours, f"training loss per exit, smoothed: {title}{note}")
    if len(losses) > 1:
        _draw_gaps(axes[1], losses, colours)
    if changing:
        _draw_weights(axes[-1], losses, changing, constant, colours)
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(file, dpi=110)
    plt.close(figure)
    return True


def _named_values(values: dict[str, float]) -> str:
    return ", ".join(f"{n} {v:g}" for n, v in values.items())


def _draw_losses(axis, losses: dict[str, list[tuple[int, float]]], colours: dict, title: str) -> None:
    """Raw losses faint behind smoothed ones, the y axis spanning the curves after their first tenth."""
    settled = []
    for name, points in losses.items():
        steps, values = [p[0] for p in points], [p[1] for p in points]
        smoothed = smooth(values)
        axis.plot(steps, values, color=colours[name], alpha=0.2, linewidth=0.8)
        axis.plot(steps, smoothed, color=colours[name], linewidth=1.8, label=name)
        settled += smoothed[len(smoothed) // 10:]
    low, high = min(settled), max(settled)
    axis.set_ylim(low - 0.1 * (high - low or 1), high + 0.15 * (high - low or 1))
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title(title, fontsize=10)
    axis.legend(title="exit (shallow to deep)", fontsize=8, title_fontsize=8)


def _draw_gaps(axis, losses: dict[str, list[tuple[int, float]]], colours: dict) -> None:
    """Each shallower exit's smoothed loss minus the deepest exit's, at the steps both logged."""
    deepest = list(losses)[-1]
    full = dict(losses[deepest])
    for name, points in list(losses.items())[:-1]:
        pairs = [(step, value - full[step]) for step, value in points if step in full]
        axis.plot([p[0] for p in pairs], smooth([p[1] for p in pairs]), color=colours[name],
                  linewidth=1.5, label=name)
    axis.axhline(0, color=colours[deepest], linewidth=1)
    axis.set_ylabel(f"loss - {deepest}'s")
    axis.set_title(f"gap to the deepest exit ({deepest}), smoothed", fontsize=9, loc="left")


def _draw_weights(axis, losses: dict, changing: dict[str, list[tuple[int, float]]], constant: dict[str, float],
                  colours: dict) -> None:
    """The loss weights that change, in the exits' order; the constant ones named in the title."""
    for name in losses:
        if name in changing:
            axis.plot(*zip(*changing[name]), color=colours[name], linewidth=1.5, label=name)
    axis.set_ylabel("loss weight")
    if constant:
        axis.set_title("constant: " + _named_values(constant), fontsize=8, loc="right")
    axis.legend(fontsize=8)


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write a PNG of every exit's loss per step (and its lambda, if it changes)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir / METRICS_NAME}: no metrics to plot (run `familial train` first)")
    output = Path(output) if output else run_dir / "loss.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.tmp.png")
    if not draw_training(records, temp, run_dir.resolve().name):
        raise FileNotFoundError(f"{run_dir / METRICS_NAME}: no per-exit losses (loss/<member>) to plot")
    temp.replace(output)
    return output
