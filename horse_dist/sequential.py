"""Sequential editing: T steps of b edits each, applied cumulatively to the model's weights (issue 6).

    python -m horse_dist.sequential [--config FILE] sequential.method=horse sequential.checkpoint=runs/<run> ...
    python -m horse_dist.sequential compare runs/<seq run> runs/<another> out=compare.png

Along the stream, every `sequential.eval_every` steps: the Frobenius norm and condition number of each edited
weight, ES on the first `retention_edits` edits (retention) and on a sample of the edits made so far,
teacher-forced and, with `sequential.live`, under greedy generation (live ES: the target starts the plain
greedy continuation; generation/live.py), GS on that sample and LS on a fixed probe of unrelated prompts.
After every step: ES (and live ES) of the step's own edits, before later edits can erode them. After the
stream: ES/GS/LS on every edit made (LS = agreement with the unedited model's predictions on the locality
prompts) and the live scores (live ES/GS, unrelated continuations unchanged, loops, generation entropy; on
CounterFact also ROME's efficacy / paraphrase / neighbourhood scores, generation/contrast.py) beside the
unedited model's. Curves go to MLflow with step = edits made, a plot and a JSON summary to the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from horse_dist.cli import run_cli, setup_logging
from horse_dist.config import (
    ConfigError,
    RunConfig,
    SequentialConfig,
    config_from_yaml,
    flatten,
    load_config,
    print_config,
    split_cli,
    to_yaml,
    with_changes,
)
from horse_dist.data import TokenizedExample, TokenizedRecords, concat_records, micro_batches, select_records
from horse_dist.generation.contrast import counterfact_scores
from horse_dist.generation.decode import Continuations
from horse_dist.generation.live import LiveEval, LiveRequests
from horse_dist.lifelong.editors import HYPERNET_METHODS, METHODS, Editor, build_editor
from horse_dist.lifelong.weight_stats import module_weight_stats, relative_change
from horse_dist.lm.load import load_frozen_lm
from horse_dist.lm.passes import PassResult, score_pass
from horse_dist.process import exit_on_sigterm
from horse_dist.tracking.mlflow_run import Tracker, experiment_name, make_tracker, run_tags
from horse_dist.tracking.plots import integer_steps
from horse_dist.training.assembly import load_data, output_dir, pick_device, resolve_path
from horse_dist.training.checkpoint import RunFolderLock, atomic_write_text, load_checkpoint

log = logging.getLogger("horse_dist.sequential")

POOLS = ("eval", "train", "all")
SUMMARY_NAME = "sequential.json"


# ---- config -----------------------------------------------------------------------------------------------
def check_sequential(seq: SequentialConfig) -> None:
    if seq.method not in METHODS:
        raise ConfigError(f"sequential.method={seq.method!r} is not one of {list(METHODS)}")
    if seq.c0_scale not in ("mean", "sum"):
        raise ConfigError(f"sequential.c0_scale={seq.c0_scale!r} is not one of ['mean', 'sum']")
    if seq.pool not in POOLS:
        raise ConfigError(f"sequential.pool={seq.pool!r} is not one of {list(POOLS)}")
    for key in ("steps", "batch_size", "retention_edits", "sample_edits"):
        if getattr(seq, key) <= 0:
            raise ConfigError(f"sequential.{key} must be positive, got {getattr(seq, key)}")
    if seq.eval_every < 0:
        raise ConfigError(f"sequential.eval_every must be >= 0, got {seq.eval_every}")
    if seq.method in HYPERNET_METHODS and not seq.checkpoint:
        raise ConfigError(
            f"sequential.method={seq.method!r} needs sequential.checkpoint=<run dir or checkpoint.pt> "
            "from `python -m horse_dist.train`"
        )


def prepare_config(config_file: str | None, overrides: list[str]) -> tuple[RunConfig, dict[str, Any] | None]:
    """The run's config, and the checkpoint state for hypernetwork methods. A checkpoint fixes the model
    (except its device) and the method; data, tracking, output and the stream come from this run's config."""

    cfg = load_config(config_file, overrides)
    check_sequential(cfg.sequential)
    if cfg.sequential.method not in HYPERNET_METHODS:
        return cfg, None
    try:
        state = load_checkpoint(resolve_path(cfg.sequential.checkpoint))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"sequential.checkpoint={cfg.sequential.checkpoint!r}: {err}") from None
    trained = config_from_yaml(state["config"], [])
    if trained.method.name != cfg.sequential.method:
        raise ConfigError(
            f"sequential.checkpoint={cfg.sequential.checkpoint!r} holds a {trained.method.name!r} hypernetwork, "
            f"but sequential.method={cfg.sequential.method!r}"
        )
    model = dataclasses.replace(trained.model, device=cfg.model.device)
    return dataclasses.replace(cfg, model=model, method=trained.method), state


# ---- the stream -------------------------------------------------------------------------------------------
def stream_order(pool_size: int, n_edits: int, seed: int) -> list[int]:
    """Which pool records are edited, in edit order: a seeded permutation's first n_edits (no repeats)."""
    if n_edits > pool_size:
        raise ValueError(f"the stream needs {n_edits} distinct edits but the pool holds {pool_size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(pool_size, generator=generator)[:n_edits].tolist()


def curve_steps(steps: int, eval_every: int) -> list[int]:
    """Steps (1-based, after editing) with a curve point: every eval_every-th and always the first and last."""
    points = {1, steps} | (set(range(eval_every, steps + 1, eval_every)) if eval_every else set())
    return sorted(points)


def retention_indices(n_made: int, retention_edits: int) -> list[int]:
    return list(range(min(n_made, retention_edits)))


def sample_indices(n_made: int, cap: int) -> list[int]:
    """At most `cap` of the first n_made edits, evenly spaced (first and last included), deterministic."""
    if n_made <= cap:
        return list(range(n_made))
    return sorted({round(i * (n_made - 1) / (cap - 1)) for i in range(cap)}) if cap > 1 else [n_made - 1]


class Scorer(Protocol):
    def score(
        self, kind: str, indices: list[int], reference: list[torch.Tensor] | None = None
    ) -> PassResult: ...

    def live(
        self, indices: list[int], reference: dict[str, Continuations] | None = None, edit_only: bool = False
    ) -> tuple[dict[str, float], dict[str, Continuations]] | None: ...


class StreamScorer:
    """Teacher-forced per-edit accuracy of the model as it is now on the stream's tokenised prompts.
    `kind` is edit (ES), equiv (GS) or unrel (locality); the same indices always give the same batches,
    so predictions can be compared across calls."""

    def __init__(
        self,
        model: nn.Module,
        examples: TokenizedRecords,
        batch_size: int,
        max_batch_tokens: int,
        pad_id: int,
        device: torch.device,
        live_eval: LiveEval | None = None,
    ) -> None:
        self.model, self.examples, self.pad_id, self.device = model, examples, pad_id, device
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.live_eval = live_eval

    def live(
        self, indices: list[int], reference: dict[str, Continuations] | None = None, edit_only: bool = False
    ) -> tuple[dict[str, float], dict[str, Continuations]] | None:
        """Mean live scores of the model as it is now on `indices` (None without live scoring), and the
        continuations. `reference`: the unedited model's (itself when None); `edit_only`: the edit prompts
        alone (live ES), as the curves need."""
        if self.live_eval is None:
            return None
        requests = LiveRequests.from_pool(self.examples, indices)
        if edit_only:
            requests = LiveRequests(requests.edit, [], [], requests.target_ids)
        generated = self.live_eval.generate(self.model, requests)
        per_edit = self.live_eval.scores(requests, generated, (reference or generated)["unrel"])
        if not edit_only and self.examples.contrast is not None:  # CounterFact: ROME's contrast scores too
            per_edit.update(counterfact_scores(self.model, self.examples, indices, self.live_eval.pad_id))
        means = {k: float(v.mean()) for k, v in per_edit.items() if v.numel()}
        return means, generated

    def score(self, kind: str, indices: list[int], reference: list[torch.Tensor] | None = None) -> PassResult:
        pool: list[TokenizedExample] = getattr(self.examples, kind)
        chosen = [pool[i] for i in indices]
        batches = [
            b.to(self.device)
            for b in micro_batches(chosen, self.batch_size, self.pad_id, self.max_batch_tokens)
        ]
        return score_pass(self.model, None, batches, len(indices), None, reference)


@dataclass
class StreamResult:
    summary: dict[str, Any]
    metrics: dict[str, float]  # the final ones


def _mean(result: PassResult, agreement: bool = False) -> float:
    values = result.agreement if agreement else result.accuracy
    return float(values.mean()) if values.numel() else float("nan")


def weight_metrics(
    stats: dict[str, tuple[float, float]], initial: dict[str, tuple[float, float]]
) -> dict[str, float]:
    out = {}
    for name, (norm, cond) in stats.items():
        out[f"weight/{name}/norm"] = norm
        out[f"weight/{name}/cond"] = cond
        out[f"weight/{name}/norm_rel_change"] = relative_change(norm, initial[name][0])
        out[f"weight/{name}/cond_rel_change"] = relative_change(cond, initial[name][1])
    return out


def edit_success(scorer: Scorer, indices: list[int]) -> dict[str, float]:
    """ES on the edit prompts of `indices`, and live ES where the scorer generates."""
    scores = {"ES": _mean(scorer.score("edit", indices))}
    live = scorer.live(indices, edit_only=True)
    if live is not None:
        scores["live_ES"] = live[0]["live_ES"]
    return scores


@dataclass
class LocalityProbe:
    """A fixed sample of the stream's unrelated prompts and the unedited model's predictions on them, so
    every curve point scores locality on the same prompts against the same reference."""

    indices: list[int]
    reference: list[torch.Tensor]


def curve_point(scorer: Scorer, made: int, seq: SequentialConfig, probe: LocalityProbe) -> dict[str, float]:
    """ES on the first edits (retention) and on a sample of those made so far (with GS on their rephrases),
    live ES too where scored, and locality (agreement with the unedited model, accuracy) on the probe."""
    point = {}
    stream_sample = sample_indices(made, seq.sample_edits)
    for name, indices in (
        ("retention", retention_indices(made, seq.retention_edits)),
        ("stream", stream_sample),
    ):
        point.update({f"{name}/{k}": v for k, v in edit_success(scorer, indices).items()})
    point["stream/GS"] = _mean(scorer.score("equiv", stream_sample))
    locality = scorer.score("unrel", probe.indices, probe.reference)
    point["locality/LS"] = _mean(locality, agreement=True)
    point["locality/accuracy"] = _mean(locality)
    return point


# curve names in a run summary: <group>_<score> for the metric <group>/<score>
CURVES = (
    "retention_ES",
    "stream_ES",
    "retention_live_ES",
    "stream_live_ES",
    "stream_GS",
    "locality_LS",
    "locality_accuracy",
)


def _add_seconds(timings: dict[str, float], key: str, started: float) -> float:
    """Add the seconds since `started` to timings[key]; return them."""
    seconds = time.perf_counter() - started
    timings[key] = timings.get(key, 0.0) + seconds
    return seconds


def run_stream(
    editor: Editor,
    model: nn.Module,
    stream: Sequence,
    scorer: Scorer,
    seq: SequentialConfig,
    tracker: Tracker,
) -> StreamResult:
    """Edit `stream` (records in edit order) in steps of seq.batch_size, cumulatively, with curves."""
    b, steps = seq.batch_size, seq.steps
    if len(stream) != b * steps:
        raise ValueError(f"stream holds {len(stream)} records, expected steps × batch_size = {steps * b}")
    everything = list(range(len(stream)))
    started = time.perf_counter()
    live = " with live greedy decoding" if seq.live else ""
    log.info("scoring the unedited model on the stream's %d edits%s", len(stream), live)
    loc_before = scorer.score("unrel", everything)
    baseline: dict[str, float] = {"eval/unedited/loc_accuracy": _mean(loc_before)}
    if seq.baseline:
        baseline["eval/unedited/ES"] = _mean(scorer.score("edit", everything))
        baseline["eval/unedited/GS"] = _mean(scorer.score("equiv", everything))
    unedited_live = scorer.live(everything)
    reference = None
    if unedited_live is not None:
        live_means, reference = unedited_live
        baseline.update({f"eval/unedited/{k}": v for k, v in live_means.items() if k != "loc_gen_same"})
    baseline_seconds = time.perf_counter() - started
    log.info("unedited model scored in %.1fs", baseline_seconds)

    probe_indices = sample_indices(len(stream), seq.sample_edits)
    # a stream no longer than the sample is its own probe: the pass above already holds its predictions
    probe_before = loc_before if probe_indices == everything else scorer.score("unrel", probe_indices)
    probe = LocalityProbe(probe_indices, probe_before.predictions)
    initial = module_weight_stats(model, editor.module_names)
    curves: dict[str, list[float | None]] = {"edits": [0.0], **{name: [None] for name in CURVES}}
    weights = {name: {"norm": [norm], "cond": [cond]} for name, (norm, cond) in initial.items()}
    tracker.log_metrics(weight_metrics(initial, initial), step=0)

    timings: dict[str, float] = {}
    made_scores: dict[str, list[float]] = {}  # per step: the step's own edits, scored right after it
    points = set(curve_steps(steps, seq.eval_every))
    bar = tqdm(range(1, steps + 1), desc=f"sequential {editor.name} b={b}", unit="step", dynamic_ncols=True)
    for step in bar:
        made = step * b
        step_started = time.perf_counter()
        reported = editor.edit(list(stream[made - b : made]))  # editor-specific timings and diagnostics
        step_seconds = _add_seconds(timings, "edit_seconds", step_started)
        made_started = time.perf_counter()
        # the step's own edits before any later one can erode them: what the editor gets right at all
        when_made = edit_success(scorer, list(range(made - b, made)))
        for name, value in when_made.items():
            made_scores.setdefault(name, []).append(value)
        _add_seconds(timings, "when_made_seconds", made_started)
        tracker.log_metrics(
            {
                "perf/step_s": step_seconds,
                **{f"editor/{k}": float(v) for k, v in reported.items()},
                **{f"made/{k}": v for k, v in when_made.items()},
            },
            step=made,
        )
        if step not in points:
            continue
        eval_started = time.perf_counter()
        stats = module_weight_stats(model, editor.module_names)
        point = curve_point(scorer, made, seq, probe)
        curves["edits"].append(float(made))
        for name in CURVES:
            curves[name].append(point.get(name.replace("_", "/", 1)))
        for name, (norm, cond) in stats.items():
            weights[name]["norm"].append(norm)
            weights[name]["cond"].append(cond)
        tracker.log_metrics({**point, **weight_metrics(stats, initial)}, step=made)
        _add_seconds(timings, "curve_seconds", eval_started)
        bar.set_postfix({k: f"{v:.3f}" for k, v in point.items()})
    bar.close()

    final_started = time.perf_counter()
    log.info("scoring the edited model on all %d edits", len(stream))
    final = {
        "eval/edited/ES": _mean(scorer.score("edit", everything)),
        "eval/edited/GS": _mean(scorer.score("equiv", everything)),
    }
    loc_after = scorer.score("unrel", everything, loc_before.predictions)
    final["eval/edited/LS"] = _mean(loc_after, agreement=True)
    final["eval/edited/loc_accuracy"] = _mean(loc_after)
    edited_live = scorer.live(everything, reference)
    if edited_live is not None:
        final.update({f"eval/edited/{k}": v for k, v in edited_live[0].items()})
    timings["final_eval_seconds"] = time.perf_counter() - final_started
    timings["baseline_seconds"] = baseline_seconds
    last = {name: (w["norm"][-1], w["cond"][-1]) for name, w in weights.items()}
    drift = weight_metrics(last, initial)
    final["eval/edited/max_norm_rel_change"] = max(
        v for k, v in drift.items() if k.endswith("norm_rel_change")
    )
    final["eval/edited/max_cond_rel_change"] = max(
        v for k, v in drift.items() if k.endswith("cond_rel_change")
    )
    final["eval/edited/retention_ES"] = curves["retention_ES"][-1]
    final.update({f"eval/edited/{k}_when_made": sum(v) / len(v) for k, v in made_scores.items()})
    metrics = {**baseline, **final, "edits": float(len(stream))}
    metrics["perf/edits_per_s"] = (
        len(stream) / timings["edit_seconds"] if timings.get("edit_seconds") else 0.0
    )
    tracker.log_metrics(metrics, step=len(stream))
    summary = {
        "method": editor.name,
        "steps": steps,
        "batch_size": b,
        "n_edits": len(stream),
        "module_names": list(editor.module_names),
        "metrics": metrics,
        "timings": timings,
        "curves": {**curves, "weights": weights},
    }
    return StreamResult(summary, metrics)


# ---- output -----------------------------------------------------------------------------------------------
def layer_label(module: str) -> str:
    """ "layer 24" for model.layers.24.mlp.down_proj (the module name when it holds no layer number)."""
    numbers = [part for part in module.split(".") if part.isdigit()]
    return f"layer {numbers[0]}" if numbers else module


def plot_sequential(summaries: list[dict[str, Any]]) -> Any:
    """Per layer ‖W‖_F / ‖W₀‖_F and cond(W) / cond(W₀) (log scale) against edits made (a line per run and layer),
    the retention / stream ES curves, and GS on the edits so far with locality on the fixed probe; several
    runs share the axes, so methods can be compared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (norm_axis, cond_axis, es_axis, gs_ls_axis) = plt.subplots(1, 4, figsize=(20, 4.5))
    for run_index, summary in enumerate(summaries):
        curves, label = summary["curves"], f"{summary['method']} b={summary['batch_size']}"
        edits = curves["edits"]
        for layer_index, (module, values) in enumerate(curves["weights"].items()):
            # a run's layers share its colour, deeper layers darker; each line is named by its layer
            style = dict(color=f"C{run_index}", alpha=0.4 + 0.6 * (layer_index + 1) / len(curves["weights"]))
            named = {"label": f"{label} {layer_label(module)}"}
            norm_axis.plot(edits, [v / values["norm"][0] for v in values["norm"]], **style, **named)
            cond_axis.plot(edits, [v / values["cond"][0] for v in values["cond"]], **style, **named)
        es_axis.plot(
            edits[1:], curves["retention_ES"][1:], "-o", color=f"C{run_index}", label=f"{label} retention"
        )
        es_axis.plot(
            edits[1:], curves["stream_ES"][1:], "--", color=f"C{run_index}", label=f"{label} edits so far"
        )
        live = curves.get("retention_live_ES", [None])[1:]
        if any(v is not None for v in live):  # streams without live scores (older runs) have no such curve
            es_axis.plot(edits[1:], live, ":", color=f"C{run_index}", label=f"{label} retention, live")
        for curve, style, name in (
            ("stream_GS", "--", "GS so far"),
            ("locality_LS", "-x", "locality (agreement)"),
        ):
            values = curves.get(curve, [None])[1:]
            if any(v is not None for v in values):  # older runs scored GS and LS at the end only
                gs_ls_axis.plot(edits[1:], values, style, color=f"C{run_index}", label=f"{label} {name}")
    norm_axis.set(xlabel="edits made", ylabel="‖W‖_F / ‖W₀‖_F", title="Frobenius norm per edited layer")
    cond_axis.set(xlabel="edits made", ylabel="cond(W) / cond(W₀)", title="condition number per edited layer")
    es_axis.set(
        xlabel="edits made", ylabel="edit success", ylim=(-0.02, 1.02), title="retention (first edits)"
    )
    for axis in (norm_axis, cond_axis):
        axis.set_yscale("log")  # drift spans orders of magnitude; an orthogonal update stays on 1
    gs_ls_axis.set(
        xlabel="edits made", ylabel="score", ylim=(-0.02, 1.02), title="generalisation and locality"
    )
    for axis in (norm_axis, cond_axis, es_axis, gs_ls_axis):
        integer_steps(axis)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6 if axis in (norm_axis, cond_axis) else 7)
    figure.tight_layout()
    return figure


TABLE_COLUMNS = (
    ("edits", "edits", "{:.0f}"),
    ("ES", "eval/edited/ES", "{:.3f}"),
    ("GS", "eval/edited/GS", "{:.3f}"),
    ("LS", "eval/edited/LS", "{:.3f}"),
    ("loc acc", "eval/edited/loc_accuracy", "{:.3f}"),
    ("retention", "eval/edited/retention_ES", "{:.3f}"),
    ("ES when made", "eval/edited/ES_when_made", "{:.3f}"),
    ("live ES when made", "eval/edited/live_ES_when_made", "{:.3f}"),
    ("live ES", "eval/edited/live_ES", "{:.3f}"),
    ("live GS", "eval/edited/live_GS", "{:.3f}"),
    ("gen same", "eval/edited/loc_gen_same", "{:.3f}"),
    ("loops", "eval/edited/loops_edit", "{:.3f}"),
    ("CF eff", "eval/edited/cf_efficacy", "{:.3f}"),
    ("CF para", "eval/edited/cf_paraphrase", "{:.3f}"),
    ("CF nbhd", "eval/edited/cf_neighbourhood", "{:.3f}"),
    ("ES before", "eval/unedited/ES", "{:.3f}"),
    ("GS before", "eval/unedited/GS", "{:.3f}"),
    ("max Δ‖W‖", "eval/edited/max_norm_rel_change", "{:.2e}"),
    ("max Δcond", "eval/edited/max_cond_rel_change", "{:.2e}"),
)


def format_table(summaries: list[dict[str, Any]]) -> str:
    """One row per run summary: final ES/GS/LS, retention, the unedited baseline and the weight drift."""
    header = ["method", *[c[0] for c in TABLE_COLUMNS]]
    rows = [
        [f"{s['method']} b={s['batch_size']}"]
        + [fmt.format(s["metrics"][key]) if key in s["metrics"] else "-" for _, key, fmt in TABLE_COLUMNS]
        for s in summaries
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header, *rows])


def compare(paths: list[str], out: str) -> str:
    """Table and overlay plot of finished runs (run folders or their sequential.json)."""
    summaries = []
    for path in paths:
        file = Path(path) / SUMMARY_NAME if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"no sequential summary at {file}")
        summaries.append(json.loads(file.read_text()))
    figure = plot_sequential(summaries)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return format_table(summaries)


def default_stream_name(cfg: RunConfig) -> str:
    model = Path(cfg.model.source.rstrip("/")).name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"seq-{cfg.sequential.method}-b{cfg.sequential.batch_size}-{model}-{cfg.data.name}-{stamp}"


def stream_pool(cfg: RunConfig, tokenizer: Any) -> tuple[list, TokenizedRecords]:
    """The records the stream draws from (cfg.sequential.pool), with their tokenised views."""

    pools = load_data(cfg, tokenizer)
    if cfg.sequential.pool == "eval":
        return pools.eval_records, pools.eval
    if cfg.sequential.pool == "train":
        return pools.train_records, pools.train
    return pools.eval_records + pools.train_records, concat_records(pools.eval, pools.train)


def run(cfg: RunConfig, checkpoint_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a stream in its run folder, locked while it runs; returns the summary."""
    check_sequential(cfg.sequential)
    cfg = with_changes(cfg, {"sequential.run_name": cfg.sequential.run_name or default_stream_name(cfg)})
    seq = cfg.sequential
    run_dir = output_dir(cfg.train.out_dir) / seq.run_name
    if (run_dir / SUMMARY_NAME).exists():
        raise ConfigError(f"{run_dir} already holds a sequential run; choose another sequential.run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunFolderLock(run_dir).acquire()  # another stream of this run_name is refused while this one runs
    try:
        return run_in_folder(cfg, run_dir, checkpoint_state)
    finally:
        lock.release()


def run_in_folder(cfg: RunConfig, run_dir: Path, checkpoint_state: dict[str, Any] | None) -> dict[str, Any]:
    """Load the model, build the editor, run the stream, write and log everything; returns the summary."""
    seq = cfg.sequential
    device = pick_device(cfg.model.device)
    model, tokenizer = load_frozen_lm(cfg.model.source, dtype=cfg.model.dtype, device=str(device))
    records, views = stream_pool(cfg, tokenizer)
    try:
        order = stream_order(len(records), seq.steps * seq.batch_size, seq.seed)
    except ValueError as err:
        raise ConfigError(
            f"sequential.steps × sequential.batch_size: {err} (sequential.pool={seq.pool!r}, "
            f"data.train_path={cfg.data.train_path!r}, data.eval_path={cfg.data.eval_path!r})"
        ) from None
    stream = [records[i] for i in order]
    log.info(
        "stream: %d steps of %d edits from %d %s records", seq.steps, seq.batch_size, len(records), seq.pool
    )
    editor = build_editor(cfg, model, tokenizer, checkpoint_state)  # after the cheap checks: C0 may be costly
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    live = LiveEval(tokenizer, cfg.train.eval_new_tokens, cfg.train.eval_loc_tokens) if seq.live else None
    scorer = StreamScorer(
        model,
        select_records(views, order),
        cfg.data.batch_size,
        cfg.data.max_batch_tokens,
        pad_id,
        device,
        live,
    )

    atomic_write_text(to_yaml(cfg), run_dir / "config.yaml")
    tags = {
        **run_tags(cfg, 1),
        "method": seq.method,
        "mode": "sequential",
        "steps": str(seq.steps),
        "batch_size": str(seq.batch_size),
    }
    tracker = make_tracker(
        cfg.tracking.enabled, cfg.tracking.uri, experiment_name(cfg), seq.run_name, tags, cfg.tracking
    )
    tracker.log_params(flatten(cfg, "sequential"))
    try:
        result = run_stream(editor, model, stream, scorer, seq, tracker)
        summary = {
            **result.summary,
            "run_name": seq.run_name,
            "model": cfg.model.source,
            "data": cfg.data.name,
            "checkpoint": seq.checkpoint,
            "pool": seq.pool,
            "seed": seq.seed,
            "pool_indices": order,
        }
        summary_path = atomic_write_text(json.dumps(summary, indent=2), run_dir / SUMMARY_NAME)
        tracker.log_artifact(summary_path)
        figure = plot_sequential([summary])
        tracker.log_figure(figure, "plots/sequential.png")
        figure.savefig(run_dir / "sequential.png", dpi=100)
        import matplotlib.pyplot as plt

        plt.close(figure)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    print(format_table([summary]))  # noqa: T201
    print(f"run folder: {run_dir}")  # noqa: T201
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`[--config FILE] key=value ...` runs a stream; `compare RUN... [out=FILE]` tabulates and overlays runs."""
    setup_logging()
    exit_on_sigterm()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        out = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("out=")), "sequential_compare.png")
        runs = [a for a in argv[1:] if not a.startswith("out=")]
        if not runs:
            raise ConfigError("compare needs one or more run folders or sequential.json files")
        print(compare(runs, out))  # noqa: T201
        print(f"plot: {out}")  # noqa: T201
        return {"plot": out}
    cli = split_cli(argv)
    cfg, state = prepare_config(cli.config_file, cli.overrides)
    if cli.show_config:
        return print_config(cfg, "sequential")
    return run(cfg, state)


if __name__ == "__main__":
    run_cli(main)
