"""`familial report`: a Markdown page and PNG charts of a family's quality against its cost.

Inputs: the family (sizes and FLOPs come from family.json), optionally the JSON written by
`familial eval --json` (loss, perplexity, agreement, latency, tasks), a training run directory
(per-exit losses from its metrics.jsonl) and separately trained baselines, a JSON list of
{"name": str, "loss": float, "parameters" (or "params"): int, "flops_per_token" (or
"flops"): number}, each with at least one of the two costs, and a loss measured on the
same held-out data. Writes report.md, pareto.png, and when their inputs are given
training_curves.png and agreement.png, into a directory replaced atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from familial import checks  # noqa: E402
from familial.staging import atomic_directory  # noqa: E402
from familial.config import ConfigError, FamilyConfig, read_json  # noqa: E402
from familial.eval.cost import member_costs  # noqa: E402
from familial.summary import format_count, summarize  # noqa: E402

DEFAULT_CONTEXT = 1024


def load_eval(path: str | Path, config: FamilyConfig) -> dict:
    data = read_json(path)
    members = data.get("members") if isinstance(data, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, dict) and "exit" in m for m in members):
        raise ConfigError(f"{path}: field 'members' must be a list of objects with an 'exit' "
                          f"(the JSON that `familial eval --json` writes)")
    exits = sorted(m["exit"] for m in members)
    if exits != sorted(config.exits):
        raise ConfigError(f"{path}: members have exits {exits}, but the family's exits are "
                          f"{config.exits} (an evaluation of another family?)")
    return data


def load_baselines(path: str | Path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of baselines, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        where = f"{path}: baseline {i}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: expected an object with a string 'name'")
        loss = checks.finite_number(f"{where} ({item['name']}): field 'loss'", item.get("loss"), error=ConfigError)
        costs = {}
        for key, aliases in (("parameters", ("parameters", "params")),
                             ("flops_per_token", ("flops_per_token", "flops"))):
            value = next((item[a] for a in aliases if a in item), None)
            if value is not None:
                costs[key] = checks.positive_number(f"{where} ({item['name']}): field '{key}'", value,
                                                    error=ConfigError)
        if not costs:
            raise ConfigError(f"{where} ({item['name']}): needs 'parameters' or 'flops_per_token'")
        out.append({"name": item["name"], "loss": float(loss), **costs})
    return out


def member_rows(config: FamilyConfig, evaluation: dict | None) -> list[dict]:
    """One dict per member: the static costs, overlaid with whatever the evaluation measured."""
    context = DEFAULT_CONTEXT
    measured = {}
    if evaluation is not None:
        measured = {m["exit"]: m for m in evaluation["members"]}
        context = next((m["flops_context"] for m in evaluation["members"] if "flops_context" in m),
                       context)
    return [cost | measured.get(cost["exit"], {}) for cost in member_costs(config, context)]


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(row: dict, key: str, digits: int) -> str:
    if key not in row:
        return "-"
    low, high = row.get(f"{key}_ci", (None, None))
    ci = f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None else ""
    return f"{row[key]:.{digits}f}{ci}"


def markdown_table(rows: list[dict]) -> list[str]:
    lines = ["| member | exit | layers | params | FLOPs/token | loss [95% CI] | loss - full [95% CI] "
             "| perplexity [95% CI] | agreement with full [95% CI] | prefill ms | decode ms/token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['exit']} | {r['layers']} | {format_count(r['parameters'])} "
            f"| {format_count(r['flops_per_token'])} | {_interval(r, 'loss', 4)} "
            f"| {_interval(r, 'loss_gap_to_full', 4)} "
            f"| {_interval(r, 'perplexity', 3)} | {_interval(r, 'agreement', 4)} "
            f"| {_number(r.get('prefill_ms'), 2)} | {_number(r.get('decode_ms_per_token'), 3)} |")
    return lines


def task_table(rows: list[dict]) -> list[str]:
    columns = sorted({(task, metric) for r in rows for task, metrics in r.get("tasks", {}).items()
                      for metric in metrics if metric != "n"})
    if not columns:
        return []
    lines = ["| member | " + " | ".join(f"{t} {m}" for t, m in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for r in rows:
        tasks = r.get("tasks", {})
        cells = [_number(tasks.get(t, {}).get(m), 4) for t, m in columns]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost and loss, cheapest first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _short_count(value: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _count_ticks(axis, first: list[float], then: list[float]) -> None:
    """Log x axis labelled at the plotted costs themselves (920K, 1.31M, ...) instead of
    matplotlib's one or two decade ticks; `first` (the members) win over `then` where two
    labels would collide."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks: list[float] = []
    for value in sorted(set(first)) + sorted(set(then)):
        if all(abs(math.log10(value / tick)) > 0.06 for tick in ticks):
            ticks.append(value)
    axis.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _short_count(value)))
    axis.tick_params(axis="x", labelrotation=30, labelsize=8)


def plot_pareto(rows: list[dict], baselines: list[dict], file: Path) -> None:
    figure = pareto_figure(rows, baselines)
    figure.savefig(file, dpi=110)
    plt.close(figure)


def pareto_figure(rows: list[dict], baselines: list[dict]):
    """Loss against parameters and against FLOPs (log axes labelled with the counts), and,
    when the evaluation has them, each member's paired loss difference to the full member
    with its interval: per-member intervals overlap even where the paired ones do not."""
    gaps = [r for r in rows[:-1] if r.get("loss_gap_to_full_ci")]
    panels = 3 if gaps else 2
    figure, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.4), squeeze=False)
    _cost_panel(axes[0][0], rows, baselines, "parameters", "parameters (log scale)")
    _cost_panel(axes[0][1], rows, baselines, "flops_per_token", "FLOPs per token (log scale)")
    if gaps:
        _gap_panel(axes[0][2], gaps, rows[-1]["name"])
    figure.suptitle("quality vs cost (lower-left is better)")
    figure.tight_layout()
    return figure


def _cost_panel(axis, rows: list[dict], baselines: list[dict], key: str, label: str) -> None:
    """Loss against one cost: the members, the baselines that give that cost, and the Pareto front."""
    family = [(r[key], r["loss"], r["name"]) for r in rows]
    axis.plot([p[0] for p in family], [p[1] for p in family], "o-", label="family members")
    for x, y, name in family:
        axis.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    others = [(b[key], b["loss"], b["name"]) for b in baselines if key in b]
    if others:
        axis.plot([p[0] for p in others], [p[1] for p in others], "s", label="separately trained")
        for x, y, name in others:
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    points = family + others
    front = [points[i] for i in pareto_front([(p[0], p[1]) for p in points])]
    axis.step([p[0] for p in front], [p[1] for p in front], "--", where="post", color="gray",
              alpha=0.7, label="Pareto front")
    axis.set_xscale("log")
    _count_ticks(axis, [p[0] for p in family], [p[0] for p in others])
    axis.margins(x=0.15, y=0.1)
    axis.set_xlabel(label)
    axis.set_ylabel("held-out loss (nats/token)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def _gap_panel(axis, gaps: list[dict], full: str) -> None:
    """Each member's paired loss difference to the full member, with its 95% interval."""
    values = [r["loss_gap_to_full"] for r in gaps]
    low = [v - r["loss_gap_to_full_ci"][0] for v, r in zip(values, gaps)]
    high = [r["loss_gap_to_full_ci"][1] - v for v, r in zip(values, gaps)]
    places = list(range(len(gaps)))
    axis.errorbar(values, places, xerr=[low, high], fmt="o", capsize=4)
    for value, place in zip(values, places):
        axis.annotate(f"{value:+.3f}", (value, place), textcoords="offset points",
                      xytext=(0, 7), ha="center", fontsize=8)
    axis.axvline(0, color="gray", linewidth=1)
    axis.set_yticks(places, [r["name"] for r in gaps])
    axis.set_ylim(len(gaps) - 0.5, -0.5)  # shallowest on top
    axis.set_xlabel(f"loss - {full}'s loss (nats/token)")
    axis.set_title(f"paired difference to {full}, 95% CI", fontsize=10)
    axis.grid(alpha=0.3, axis="x")


def plot_training(records: list[dict], title: str, file: Path) -> bool:
    from familial.train.plot import draw_training

    return draw_training(records, file, title)


def plot_agreement(rows: list[dict], matrix: dict | None, file: Path) -> None:
    panels = 2 if matrix else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axis = axes[0][0]
    values = [r["agreement"] for r in rows]
    errors = [[v - r.get("agreement_ci", (v, v))[0] for v, r in zip(values, rows)],
              [r.get("agreement_ci", (v, v))[1] - v for v, r in zip(values, rows)]]
    axis.bar([r["name"] for r in rows], values, yerr=errors, capsize=4)
    axis.set_ylim(0, 1)
    axis.set_ylabel("top-1 agreement with the full member")
    axis.grid(alpha=0.3, axis="y")
    if matrix:
        axis = axes[0][1]
        image = axis.imshow(matrix["rates"], vmin=0, vmax=1, cmap="viridis")
        labels = matrix["names"]
        axis.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        for i, row in enumerate(matrix["rates"]):
            for j, value in enumerate(row):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="black" if value > 0.5 else "white")
        axis.set_title("pairwise top-1 agreement")
        figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(file, dpi=110)
    plt.close(figure)


def build_report(family_dir: str | Path, out_dir: str | Path, eval_json: str | Path | None = None,
                 run_dir: str | Path | None = None, baselines_json: str | Path | None = None,
                 overwrite: bool = False) -> Path:
    config = FamilyConfig.load(family_dir)
    evaluation = load_eval(eval_json, config) if eval_json else None
    baselines = load_baselines(baselines_json) if baselines_json else []
    records = _read_run(run_dir) if run_dir else []
    rows = member_rows(config, evaluation)
    summary = summarize(config)
    lines = [f"# Family report: {family_title(family_dir)}", "",
             f"Exits {config.exits} of {config.num_hidden_layers} trunk layers, hidden "
             f"{config.hidden_size}. The family holds {format_count(summary.family_parameters)} "
             f"parameters; its members stored separately would hold "
             f"{format_count(summary.separate_parameters)}.", ""]
    if evaluation is not None and "data" in evaluation:
        data = evaluation["data"]
        lines += [f"Held-out data: `{data.get('path')}`, {data.get('tokens')} target tokens in "
                  f"{data.get('windows')} windows of {data.get('seq_len')} tokens; intervals are "
                  f"percentile bootstrap over windows ({data.get('resamples')} resamples).", ""]
    lines += ["## Members", ""] + markdown_table(rows)
    lines += ["", f"FLOPs per token at context {rows[0]['flops_context']}: 2 x matmul parameters "
              "(LM head included) + 4 x layers x context x heads x head_dim (familial.eval.cost).", ""]
    tasks = task_table(rows)
    if tasks:
        lines += ["## Tasks", ""] + tasks + [""]
    with atomic_directory(out_dir, overwrite) as staging:
        if all("loss" in r for r in rows):
            plot_pareto(rows, baselines, staging / "pareto.png")
            lines += ["## Quality vs cost", "", "![quality vs cost](pareto.png)", ""]
        else:
            lines += ["## Quality vs cost", "", "No held-out loss: run `familial eval --data SHARDS "
                      "--json EVAL` and pass `--eval EVAL`.", ""]
        if records and plot_training(records, Path(run_dir).resolve().name,
                                     staging / "training_curves.png"):
            lines += ["## Training", "", f"From `{run_dir}`.", "",
                      "![per-exit training curves](training_curves.png)", ""]
        if all("agreement" in r for r in rows):
            matrix = evaluation.get("agreement_matrix")
            plot_agreement(rows, matrix, staging / "agreement.png")
            lines += ["## Agreement with the full member", "",
                      "Share of held-out target tokens where the member's top-1 token is the full "
                      "member's.", "", "![agreement](agreement.png)", ""]
        (staging / "report.md").write_text("\n".join(lines))
    return Path(out_dir) / "report.md"


def family_title(family_dir: str | Path) -> str:
    """A name that says which family: a run's family (RUN/family, RUN/checkpoints/step-N/family,
    OUT/family) is named after its run, not after the directory every run calls `family`."""
    path = Path(family_dir).resolve()
    if path.name != "family":
        return path.name
    parent = path.parent
    step = parent.name[len("step-"):]
    if parent.name.startswith("step-") and step.isdigit() and parent.parent.name == "checkpoints":
        return f"{parent.parent.parent.name}, step {int(step)}"
    return parent.name


def _read_run(run_dir: str | Path) -> list[dict]:
    from familial.train.metrics import METRICS_NAME, read_metrics

    if not (Path(run_dir) / METRICS_NAME).is_file():
        raise FileNotFoundError(f"{Path(run_dir) / METRICS_NAME}: not found (is {run_dir} a "
                                f"training run directory?)")
    return read_metrics(run_dir)
