"""Train several methods on the same model and data as one MLflow parent run with a nested run per method.

    python -m horse_dist.sweep methods=horse,malmen,horse_reference [--config FILE] [key=value ...]
    python -m horse_dist.sweep methods=horse,malmen knob=method.eta_init:3,6,9 [key=value ...]

Each child is a full `python -m horse_dist.train` run (local or `dist.backend=ray`) with `method=<name>`
(and with `knob`, one child per method and value of that config key: each method's trade-off curve) and
the shared overrides; the parent holds each method's final ES/GS/LS (`<method>/ES`, ...), a side-by-side table
(sweep_methods.json), a bar plot (plots/methods.png) and the trade-off plot (plots/pareto.png: live ES against
unrelated continuations kept, for the unedited model, each untrained and each trained editor), and the console
gets the same table.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from horse_dist import train
from horse_dist.cli import run_cli, setup_logging
from horse_dist.compare import pareto_figure, state_points
from horse_dist.config import ConfigError, flatten, load_config_with_extras, print_config, split_cli
from horse_dist.process import exit_on_sigterm
from horse_dist.tracking.mlflow_run import experiment_name, make_tracker, run_tags

log = logging.getLogger("horse_dist.sweep")

TABLE_KEYS = (
    "edited/ES",
    "edited/GS",
    "edited/LS",
    "edited/loc_agreement",
    "edited/live_ES",
    "edited/live_GS",
    "edited/loc_gen_same",
    "median_step_seconds",
)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ConfigError(
            "methods= needs a comma-separated list of method presets, e.g. methods=horse,malmen"
        )
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods={text!r} names a method twice")
    return methods


def parse_knob(text: str) -> tuple[str, list[str]]:
    """`section.key:v1,v2,...` -> (key, values)."""
    key, _, values_text = text.partition(":")
    values = [v.strip() for v in values_text.split(",") if v.strip()]
    if not key.strip() or not values:
        raise ConfigError(
            f"knob={text!r}: expected section.key:value1,value2,... e.g. knob=method.eta_init:3,6,9"
        )
    return key.strip(), values


def sweep_children(methods: list[str], knob: tuple[str, list[str]] | None) -> list[tuple[str, list[str]]]:
    """(label, overrides) per child run: one per method, or per method and knob value."""
    if knob is None:
        return [(method, [f"method={method}"]) for method in methods]
    key, values = knob
    short = key.split(".")[-1]
    return [
        (f"{method} {short} {value}", [f"method={method}", f"{key}={value}"])
        for method in methods
        for value in values
    ]


def format_methods_table(rows: dict[str, dict[str, float]]) -> str:
    width = max([len("method"), *map(len, rows)]) + 2
    header = f"{'method':<{width}}" + "".join(f"{key.split('/')[-1]:>20}" for key in TABLE_KEYS)
    lines = [header]
    for label, result in rows.items():
        cells = "".join(f"{result.get(key, float('nan')):>20.3f}" for key in TABLE_KEYS)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def plot_methods(rows: dict[str, dict[str, float]], title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("edited/ES", "edited/GS", "edited/LS", "edited/live_ES", "edited/loc_gen_same")
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(rows))
    for i, (method, result) in enumerate(rows.items()):
        positions = [m + i * width for m in range(len(metrics))]
        axis.bar(positions, [result.get(k, 0.0) for k in metrics], width, label=method)
    axis.set_xticks([m + width * (len(rows) - 1) / 2 for m in range(len(metrics))])
    axis.set_xticklabels([k.split("/")[-1] for k in metrics])
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    return figure


PARETO_AXES = ("live_ES", "loc_gen_same")  # (edit success, locality) of the parent run's Pareto plot


def method_points(
    rows: dict[str, dict[str, float]], y: str, x: str
) -> dict[str, dict[str, tuple[float, float]]]:
    """(x, y) per method and model state (unedited, untrained, edited) from the children's results."""
    points = {method: state_points(result, y, x) for method, result in rows.items()}
    return {method: states for method, states in points.items() if states}


def run_methods_sweep(
    config_file: str | None,
    overrides: list[str],
    methods: list[str],
    knob: tuple[str, list[str]] | None = None,
) -> dict[str, Any]:

    shared = [o for o in overrides if o.split("=", 1)[0] not in ("methods", "method", "knob")]
    cfg, _ = load_config_with_extras(config_file, shared, extras=())
    children = sweep_children(methods, knob)
    for _, child_overrides in children:  # every child's config must resolve before the first run starts
        load_config_with_extras(config_file, [*shared, *child_overrides], extras=())
    name = f"sweep-methods-{cfg.data.name}-{Path(cfg.model.source).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {**run_tags(cfg, cfg.dist.num_workers), "method": ",".join(methods), "sweep": "methods"}
    params = {**flatten(cfg, "sweep"), "method.name": ",".join(methods), "sweep.methods": ",".join(methods)}
    if knob is not None:
        tags["sweep_knob"] = knob[0]
        params["sweep.knob"] = f"{knob[0]}:{','.join(knob[1])}"
    parent = make_tracker(
        cfg.tracking.enabled, cfg.tracking.uri, experiment_name(cfg), name, tags, cfg.tracking
    )
    parent.log_params(params)
    parent_id = getattr(parent, "run_id", "")
    rows: dict[str, dict[str, float]] = {}
    try:
        for label, child_overrides in children:
            child = [
                *shared,
                *child_overrides,
                f"tracking.parent_run_id={parent_id}",
                f"train.run_name={name}-{label.replace(' ', '-')}",
            ]
            argv = ([] if config_file is None else ["--config", config_file]) + child
            result = train.main(argv)
            rows[label] = {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
            parent.log_metrics(
                {f"{label}/{k.split('/')[-1]}": rows[label][k] for k in TABLE_KEYS if k in rows[label]}, 0
            )
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "sweep_methods.json"
            path.write_text(json.dumps(rows, indent=2))
            parent.log_artifact(path)
        title = f"{cfg.model.source}, {cfg.data.name}, {cfg.data.n_edits} edits"
        try:
            figures = {"plots/methods.png": plot_methods(rows, title)}
            points = method_points(rows, *PARETO_AXES)
            if points:
                figures["plots/pareto.png"] = pareto_figure(points, *PARETO_AXES, title)
        except Exception as err:  # e.g. no matplotlib: the runs themselves are fine
            log.warning("could not plot the methods (%s)", err)
        else:
            import matplotlib.pyplot as plt

            for name, figure in figures.items():
                parent.log_figure(figure, name)
                plt.close(figure)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    print(f"\nmethods on {cfg.model.source}, {cfg.data.name}:\n{format_methods_table(rows)}")  # noqa: T201
    return {"parent_run_id": parent_id, "results": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:

    setup_logging()
    exit_on_sigterm()
    cli = split_cli(sys.argv[1:] if argv is None else argv)
    methods_arg = [o.split("=", 1)[1] for o in cli.overrides if o.startswith("methods=")]
    if not methods_arg:
        raise ConfigError("python -m horse_dist.sweep needs methods=a,b,...")
    if cli.show_config:  # each child run is this config with its method preset
        shared = [o for o in cli.overrides if o.split("=", 1)[0] not in ("methods", "method", "knob")]
        return print_config(load_config_with_extras(cli.config_file, shared, extras=())[0], "sweep")
    knob_arg = [o.split("=", 1)[1] for o in cli.overrides if o.startswith("knob=")]
    knob = parse_knob(knob_arg[-1]) if knob_arg else None
    return run_methods_sweep(cli.config_file, cli.overrides, parse_methods(methods_arg[-1]), knob)


if __name__ == "__main__":
    run_cli(main)
