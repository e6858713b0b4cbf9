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
    settled = []
    for name, points in losses.items():
        steps, values = [p[0] for p in points], [p[1] for p in points]
        smoothed = smooth(values)
        axes[0].plot(steps, values, color=colours[name], alpha=0.2, linewidth=0.8)
        axes[0].plot(steps, smoothed, color=colours[name], linewidth=1.8, label=name)
        settled += smoothed[len(smoothed) // 10:]
    low, high = min(settled), max(settled)
    axes[0].set_ylim(low - 0.1 * (high - low or 1), high + 0.15 * (high - low or 1))
    axes[0].set_ylabel("cross-entropy (nats/token)")
    note = ("; loss weights constant: " + ", ".join(f"{n} {v:g}" for n, v in constant.items())
            if constant and not changing else "")
    axes[0].set_title(f"training loss per exit, smoothed: {title}{note}", fontsize=10)
    axes[0].legend(title="exit (shallow to deep)", fontsize=8, title_fontsize=8)
    if len(losses) > 1:
        deepest = list(losses)[-1]
        full = dict(losses[deepest])
        for name, points in list(losses.items())[:-1]:
            pairs = [(step, value - full[step]) for step, value in points if step in full]
            axes[1].plot([p[0] for p in pairs], smooth([p[1] for p in pairs]), color=colours[name],
                         linewidth=1.5, label=name)
        axes[1].axhline(0, color=colours[deepest], linewidth=1)
        axes[1].set_ylabel(f"loss - {deepest}'s")
        axes[1].set_title(f"gap to the deepest exit ({deepest}), smoothed", fontsize=9, loc="left")
    if changing:
        for name in losses:
            if name in changing:
                axes[-1].plot(*zip(*changing[name]), color=colours[name], linewidth=1.5, label=name)
        axes[-1].set_ylabel("loss weight")
        if constant:
            axes[-1].set_title("constant: " + ", ".join(f"{n} {v:g}" for n, v in constant.items()),
                               fontsize=8, loc="right")
        axes[-1].legend(fontsize=8)
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(file, dpi=110)
    plt.close(figure)
    return True


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
