"""Compare tracked runs side by side: config differences and final metrics, plus a comparison plot.

    python -m horse_dist.compare [--uri URI] [--experiment NAME ...] [--run RUN_ID ...]
                                 [--filter "params.`method.name` = 'horse'"] [--max-runs 10]
                                 [--metrics eval/edited/ES,train/gen_loss] [--plot compare.png] [--all-params]
                                 [--pareto live_ES:loc_gen_same] [--pareto-plot pareto.png]

The URI defaults to $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (what training writes by default).
With no --experiment and no --run, the newest runs of every experiment are compared.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from horse_dist.tracking.plots import integer_steps

TAG_ROWS = ("method", "model", "dataset", "n_edits", "world_size", "zero_stage", "seed", "git_commit")
DEFAULT_METRICS = (
    "eval/edited/ES",
    "eval/edited/GS",
    "eval/edited/LS",
    "eval/edited/loc_agreement",
    "eval/edited/live_ES",
    "eval/edited/live_GS",
    "eval/edited/loc_gen_same",
    "eval/edited/loops_edit",
    "eval/unedited/ES",
    "eval/unedited/GS",
    "eval/unedited/LS",
    "train/gen_loss",
    "train/loc_loss",
    "perf/median_step_s",
    "perf/edits_per_s",
    "perf/peak_rss_gb",
)
BAR_METRICS = ("ES", "GS", "LS", "loc_agreement")


def find_runs(
    client: Any, experiments: list[str], run_ids: list[str], filter_string: str, max_runs: int
) -> list:
    runs = [client.get_run(run_id) for run_id in run_ids]
    if experiments or not run_ids:
        if experiments:
            ids = []
            for name in experiments:
                found = client.get_experiment_by_name(name) or _experiment_by_id(client, name)
                if found is None:
                    raise SystemExit(f"no experiment named {name!r}")
                ids.append(found.experiment_id)
        else:
            ids = [e.experiment_id for e in client.search_experiments()]
        runs += client.search_runs(
            ids, filter_string=filter_string, max_results=max_runs, order_by=["attributes.start_time DESC"]
        )
    elif filter_string:
        raise SystemExit("--filter applies to --experiment searches; give --experiment too")
    seen, unique = set(), []
    for run in runs:
        if run.info.run_id not in seen:
            seen.add(run.info.run_id)
            unique.append(run)
    return unique


def _experiment_by_id(client: Any, key: str) -> Any:
    try:
        return client.get_experiment(key)
    except Exception:
        return None


def _cell(value: Any, width: int = 28) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def comparison_rows(
    runs: list, metrics: tuple[str, ...], all_params: bool = False
) -> list[tuple[str, list[str]]]:
    """(section header or row label, cells) rows: tags, params that differ (all with all_params), metrics."""
    rows: list[tuple[str, list[str]]] = [("run", [r.info.run_name or r.info.run_id[:8] for r in runs])]
    rows.append(("run_id", [r.info.run_id[:12] for r in runs]))
    rows.append(("status", [r.info.status for r in runs]))
    for tag in TAG_ROWS:
        values = [r.data.tags.get(tag) for r in runs]
        if any(v is not None for v in values):
            rows.append((f"tag.{tag}", [_cell(v) for v in values]))
    keys = sorted({k for r in runs for k in r.data.params})
    rows.append(("# params" + ("" if all_params else " that differ"), []))
    for key in keys:
        values = [r.data.params.get(key) for r in runs]
        if all_params or len(set(values)) > 1:
            rows.append((key, [_cell(v) for v in values]))
    rows.append(("# final metrics", []))
    for key in metrics:
        values = [r.data.metrics.get(key) for r in runs]
        if any(v is not None for v in values):
            rows.append((key, [_cell(v) for v in values]))
    return rows


def format_rows(rows: list[tuple[str, list[str]]]) -> str:
    label_width = max(len(label) for label, _ in rows)
    n = max(len(cells) for _, cells in rows)
    widths = [max((len(cells[i]) for _, cells in rows if len(cells) > i), default=0) for i in range(n)]
    lines = []
    for label, cells in rows:
        if not cells:
            lines.append(label)
            continue
        lines.append(f"{label:<{label_width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def plot_comparison(client: Any, runs: list, path: str | Path) -> Path:
    """Left: the edited ES/GS/LS/locality of each run (bars). Right: train/gen_loss against the meta-step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        label = run.info.run_name or run.info.run_id[:8]
        values = [run.data.metrics.get(f"eval/edited/{m}", float("nan")) for m in BAR_METRICS]
        bars.bar([j + i * width for j in range(len(BAR_METRICS))], values, width, label=label)
        history = client.get_metric_history(run.info.run_id, "train/gen_loss")
        if history:
            history = sorted(history, key=lambda m: m.step)
            curves.plot([m.step for m in history], [m.value for m in history], marker=".", label=label)
    bars.set_xticks([j + 0.4 - width / 2 for j in range(len(BAR_METRICS))], BAR_METRICS)
    bars.set(ylabel="accuracy (edited)", ylim=(0, 1.05), title="final evaluation")
    curves.set(xlabel="meta-step", ylabel="train/gen_loss", title="training")
    integer_steps(curves)
    for axis in (bars, curves):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


PARETO_ROWS = {"unedited": "s", "untrained": "^", "edited": "o"}  # marker per model state


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (higher is better on both), by x."""
    frontier = []
    for x, y in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if not frontier or y > frontier[-1][1]:
            frontier.append((x, y))
    return frontier[::-1]


def pareto_figure(points: dict[str, dict[str, tuple[float, float]]], y: str, x: str, title: str = "") -> Any:
    """`points[label][row] = (x, y)` for the rows of PARETO_ROWS: one colour per label (run or method), one
    marker per model state; the dashed line is the frontier of the edited and untrained points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.5))
    # a knob sweep of four methods has 12 labels: past ten, tab10's colours would repeat
    colours = plt.get_cmap("tab10" if len(points) <= 10 else "tab20")
    edits = []
    for i, (label, rows) in enumerate(points.items()):
        colour = colours(i % colours.N)
        for row, (px, py) in rows.items():
            axis.scatter(px, py, color=colour, marker=PARETO_ROWS[row], label=f"{label} {row}", s=36)
            if row != "unedited":
                edits.append((px, py))
    frontier = pareto_frontier(edits)
    if len(frontier) > 1:
        axis.plot(*zip(*frontier), "--", color="grey", lw=1, label="frontier")
    axis.set(xlabel=f"{x} (locality)", ylabel=f"{y} (edit success)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points, never on them
    figure.tight_layout()
    return figure


def state_points(
    metrics: dict[str, float], y: str, x: str, prefix: str = ""
) -> dict[str, tuple[float, float]]:
    """(x, y) per model state of PARETO_ROWS found in `metrics` (keys `<prefix><row>/<metric>`)."""
    keys = {row: (f"{prefix}{row}/{x}", f"{prefix}{row}/{y}") for row in PARETO_ROWS}
    return {
        row: (metrics[kx], metrics[ky]) for row, (kx, ky) in keys.items() if kx in metrics and ky in metrics
    }


def run_points(runs: list, y: str, x: str) -> dict[str, dict[str, tuple[float, float]]]:
    """Each run's (x, y) per model state, from its final `eval/<row>/<metric>` metrics."""
    points = {
        run.info.run_name or run.info.run_id[:8]: state_points(run.data.metrics, y, x, "eval/")
        for run in runs
    }
    return {label: rows for label, rows in points.items() if rows}


def save_figure(figure: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m horse_dist.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--experiment", "-e", action="append", default=[], help="name or id; repeatable")
    parser.add_argument("--run", "-r", action="append", default=[], help="run id; repeatable")
    parser.add_argument(
        "--filter", "-f", default="", help="an MLflow search filter, e.g. \"tags.method = 'horse'\""
    )
    parser.add_argument("--max-runs", type=int, default=10)
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric keys")
    parser.add_argument("--plot", default="compare.png", help="where to write the plot ('' for none)")
    parser.add_argument(
        "--all-params", action="store_true", help="show every param, not only those that differ"
    )
    parser.add_argument(
        "--pareto",
        default="",
        metavar="Y:X",
        help="also plot edit success Y against locality X per run and model state, e.g. live_ES:loc_gen_same",
    )
    parser.add_argument("--pareto-plot", default="pareto.png", help="where --pareto writes its plot")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from mlflow import MlflowClient

    client = MlflowClient(args.uri)
    runs = find_runs(client, args.experiment, args.run, args.filter, args.max_runs)
    if not runs:
        raise SystemExit(f"no runs found in {args.uri}")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    table = format_rows(comparison_rows(runs, metrics, args.all_params))
    print(table)  # noqa: T201
    if args.plot:
        print(f"\nplot: {plot_comparison(client, runs, args.plot)}")  # noqa: T201
    if args.pareto:
        y, _, x = args.pareto.partition(":")
        points = run_points(runs, y, x)
        if not x or not points:
            raise SystemExit(f"--pareto {args.pareto}: no run has eval/<row>/{y} and eval/<row>/{x}")
        path = save_figure(pareto_figure(points, y, x, f"{len(points)} runs"), args.pareto_plot)
        print(f"pareto plot: {path}")  # noqa: T201
    return table


if __name__ == "__main__":
    # here, not at the top: compare reads MLflow only, and the cli's error types import torch (~7 s)
    from horse_dist.cli import run_cli

    run_cli(main)
