"""Sequential editing (issue 6 item 4): stream bookkeeping with a fake editor, a trained tiny hypernetwork
edited cumulatively, weight statistics against float64 references, MLflow curves, and config errors."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_model

from horse_dist import sequential, train
from horse_dist.config import JOB_SECTIONS, ConfigError, load_config
from horse_dist.data import EditRecord
from horse_dist.lifelong.weight_stats import norm_and_condition
from horse_dist.lm.export import apply_shifts_
from horse_dist.lm.passes import PassResult
from horse_dist.lm.tiny_tokenizers import build_sentencepiece_tokenizer
from horse_dist.tracking.mlflow_run import NullTracker
from horse_dist.training.edit_call import apply_edits

HEAD_FILE = Path(__file__).resolve().parent.parent / "data/zsre/zsre_mend_eval_head.json"
DOWN = ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "zsre32.json"
    path.write_text(json.dumps(json.loads(HEAD_FILE.read_text())[:32]))
    return path


def _data_overrides(data_file: Path) -> dict:
    return {
        "data.train_path": str(data_file),
        "data.eval_path": str(data_file),
        "data.n_edits": 8,
        "data.batch_size": 4,
    }


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_dir, data_file, tmp_path_factory) -> Path:
    """A HORSE hypernetwork on the tiny model after 2 meta-steps."""
    out = tmp_path_factory.mktemp("runs")
    overrides = {
        "model.source": str(tiny_dir),
        "model.n_edit_layers": 2,
        "method.rank": 16,
        "method.chunk_rows": 16,
        "method.eta_init": 1e-2,
        **_data_overrides(data_file),
        "train.steps": 2,
        "train.meta_lr": 3e-2,
        "train.eval_n_edits": 8,
        "train.eval_batches": 1,
        "train.out_dir": str(out),
        "train.run_name": "horse_tiny",
        "tracking.enabled": False,
    }
    train.main([f"{k}={v}" for k, v in overrides.items()])
    return out / "horse_tiny"


def _seq_overrides(checkpoint_dir: Path, data_file: Path, out: Path, **extra) -> list[str]:
    base = {
        "sequential.method": "horse",
        "sequential.checkpoint": str(checkpoint_dir),
        "sequential.steps": 3,
        "sequential.batch_size": 2,
        "sequential.eval_every": 2,
        "sequential.retention_edits": 3,
        "sequential.sample_edits": 4,
        "sequential.run_name": "seq",
        **_data_overrides(data_file),
        "train.out_dir": str(out),
        "tracking.enabled": False,
        "tracking.system_metrics": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ---- fakes ------------------------------------------------------------------------------------------------
def _record(i: int) -> EditRecord:
    return EditRecord(f"prompt {i}", f"answer {i}", f"rephrase {i}", f"loc {i}", f"loc answer {i}")


def _rotation_for(record: EditRecord, size: int) -> torch.Tensor:
    """I + 0.05 A with A fixed by the record's text: edits do not commute, so order matters."""
    generator = torch.Generator().manual_seed(zlib.crc32(record.prompt.encode()))
    return torch.eye(size) + 0.05 * torch.randn(size, size, generator=generator)


class FakeEditor:
    """W ← (I + 0.05 A_r) W per record, in record order: cumulative and order-dependent."""

    name = "fake"

    def __init__(self, model) -> None:
        self.model, self.module_names, self.calls = model, list(DOWN), []

    @torch.no_grad()
    def edit(self, records):
        self.calls.append([r.prompt for r in records])
        for record in records:
            for name in self.module_names:
                weight = self.model.get_submodule(name).weight
                weight.copy_(_rotation_for(record, weight.shape[0]) @ weight)
        return {"edit_seconds": 0.001}


class RecordingScorer:
    """Accuracy 1 for even stream positions, 0 for odd ones; remembers every call."""

    def __init__(self) -> None:
        self.calls = []

    def score(self, kind, indices, reference=None):
        self.calls.append((kind, list(indices), reference is not None))
        accuracy = torch.tensor([1.0 - i % 2 for i in indices])
        return PassResult(torch.zeros(len(indices)), accuracy, accuracy.clone(), [torch.tensor([0])])

    def live(self, indices, reference=None, edit_only=False):
        return None  # no generation: the teacher-forced curves alone


class RecordingTracker(NullTracker):
    def __init__(self) -> None:
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def _tiny_model():
    return build_tiny_model("llama", build_sentencepiece_tokenizer(), seed=1)


# ---- pure helpers -----------------------------------------------------------------------------------------
def test_stream_order_is_seeded_distinct_and_bounded():
    first = sequential.stream_order(50, 20, seed=3)
    assert first == sequential.stream_order(50, 20, seed=3)
    assert first != sequential.stream_order(50, 20, seed=4)
    assert len(set(first)) == 20 and all(0 <= i < 50 for i in first)
    assert sequential.stream_order(50, 30, seed=3)[:20] == first  # a longer stream extends a shorter one
    with pytest.raises(ValueError, match="needs 51 distinct edits but the pool holds 50"):
        sequential.stream_order(50, 51, seed=0)


def test_curve_points_retention_and_sample_indices():
    assert sequential.curve_steps(10, 4) == [1, 4, 8, 10]
    assert sequential.curve_steps(3, 0) == [1, 3]
    assert sequential.retention_indices(2, 5) == [0, 1]
    assert sequential.retention_indices(9, 5) == [0, 1, 2, 3, 4]
    assert sequential.sample_indices(3, 4) == [0, 1, 2]
    sample = sequential.sample_indices(100, 5)
    assert sample == [0, 25, 50, 74, 99] or sample == [0, 25, 50, 75, 99]
    assert sample[0] == 0 and sample[-1] == 99 and len(sample) == 5


def test_norm_and_condition_match_float64_references():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 7, generator=generator)
    norm, cond = norm_and_condition(weight)
    reference = weight.double().numpy()
    assert norm == pytest.approx(np.linalg.norm(reference, "fro"), rel=1e-12)
    assert cond == pytest.approx(np.linalg.cond(reference), rel=1e-9)
    singular = torch.ones(4, 4)
    assert norm_and_condition(singular)[1] > 1e12  # rank one: σ_min ~ 0 in float64


# ---- the runner, with a fake editor -----------------------------------------------------------------------
def test_fake_stream_is_cumulative_with_exact_curves():
    model = _tiny_model()
    initial = {name: model.get_submodule(name).weight.detach().clone() for name in DOWN}
    stream = [_record(i) for i in range(12)]
    seq = load_config(
        None,
        [
            "sequential.steps=4",
            "sequential.batch_size=3",
            "sequential.eval_every=2",
            "sequential.retention_edits=4",
            "sequential.sample_edits=5",
        ],
    ).sequential
    editor, scorer, tracker = FakeEditor(model), RecordingScorer(), RecordingTracker()
    result = sequential.run_stream(editor, model, stream, scorer, seq, tracker)

    # the steps got consecutive slices of the stream, in order
    assert editor.calls == [[f"prompt {i}" for i in range(s, s + 3)] for s in (0, 3, 6, 9)]
    # weights after T steps = the edits applied one by one by hand, in stream order
    for name in DOWN:
        expected = initial[name].clone()
        for record in stream:
            expected = _rotation_for(record, expected.shape[0]) @ expected
        torch.testing.assert_close(model.get_submodule(name).weight, expected, rtol=1e-5, atol=1e-6)
    # norms / condition numbers on the final weights match torch.linalg in float64
    for name in DOWN:
        final = model.get_submodule(name).weight.detach().double()
        sv = torch.linalg.svdvals(final)
        curves = result.summary["curves"]["weights"][name]
        assert curves["norm"][-1] == pytest.approx(float(torch.linalg.matrix_norm(final)), rel=1e-12)
        assert curves["cond"][-1] == pytest.approx(float(sv.max() / sv.min()), rel=1e-9)
        assert curves["norm"][0] == pytest.approx(float(torch.linalg.matrix_norm(initial[name].double())))
    # retention at step t scores exactly the first min(t·b, r) edits; "so far" samples within the edits made
    edit_calls = [indices for kind, indices, _ in scorer.calls if kind == "edit"]
    # baseline (all); per step its own edits, then at curve points (steps 1, 2, 4) retention and sample;
    # then the final ES (all)
    assert edit_calls[0] == list(range(12)) and edit_calls[-1] == list(range(12))
    assert edit_calls[1:-1] == [
        [0, 1, 2],
        [0, 1, 2],
        [0, 1, 2],
        [3, 4, 5],
        [0, 1, 2, 3],
        [0, 1, 2, 4, 5],
        [6, 7, 8],
        [9, 10, 11],
        [0, 1, 2, 3],
        [0, 3, 6, 8, 11],
    ]
    # each step's edits scored right after it (even positions succeed): 2/3, 1/3, 2/3, 1/3
    made_ES = [m["made/ES"] for _, m in tracker.logged if "made/ES" in m]
    assert made_ES == pytest.approx([2 / 3, 1 / 3, 2 / 3, 1 / 3])
    assert result.metrics["eval/edited/ES_when_made"] == pytest.approx(0.5)
    # locality: all at the start, the fixed probe (unedited, then at each curve point against that
    # reference), all at the end against the unedited predictions
    probe = [0, 3, 6, 8, 11]
    unrel_calls = [(indices, ref) for kind, indices, ref in scorer.calls if kind == "unrel"]
    assert unrel_calls == [
        (list(range(12)), False),
        (probe, False),
        *[(probe, True)] * 3,
        (list(range(12)), True),
    ]
    equiv_calls = [indices for kind, indices, _ in scorer.calls if kind == "equiv"]
    everything = list(range(12))
    assert equiv_calls == [everything, [0, 1, 2], [0, 1, 2, 4, 5], [0, 3, 6, 8, 11], everything]
    curves = result.summary["curves"]
    assert curves["edits"] == [0, 3, 6, 12]
    assert curves["retention_ES"][1:] == pytest.approx([2 / 3, 0.5, 0.5])
    assert curves["stream_GS"][1:] == pytest.approx([2 / 3, 0.6, 0.6])
    assert curves["locality_LS"][1:] == pytest.approx([0.6] * 3)  # even probe positions: 0, 6, 8
    assert curves["stream_live_ES"] == [None] * 4  # this scorer does not generate
    assert result.metrics["eval/edited/ES"] == pytest.approx(0.5) and result.metrics[
        "eval/edited/LS"
    ] == pytest.approx(0.5)
    # the tracker saw the curves with step = edits made
    steps_with = {
        key: [s for s, m in tracker.logged if key in m] for key in ("retention/ES", f"weight/{DOWN[0]}/cond")
    }
    assert steps_with["retention/ES"] == [3, 6, 12]
    assert steps_with[f"weight/{DOWN[0]}/cond"] == [0, 3, 6, 12]
    assert (
        result.metrics["eval/edited/max_norm_rel_change"] > 1e-3
    )  # these fake edits are not norm-preserving


def test_a_stream_within_the_sample_is_its_own_locality_probe():
    model = _tiny_model()
    seq = load_config(None, ["sequential.steps=2", "sequential.batch_size=2", "sequential.sample_edits=8"])
    scorer = RecordingScorer()
    result = sequential.run_stream(
        FakeEditor(model), model, [_record(i) for i in range(4)], scorer, seq.sequential, NullTracker()
    )
    unrel_calls = [(indices, ref) for kind, indices, ref in scorer.calls if kind == "unrel"]
    # no second unedited pass: the probe is every edit, scored once before the first edit
    assert unrel_calls == [([0, 1, 2, 3], False)] + [([0, 1, 2, 3], True)] * 3  # 2 curve points, the end
    assert result.summary["curves"]["locality_LS"][1:] == pytest.approx([0.5, 0.5])


def test_run_stream_refuses_a_stream_of_the_wrong_length():
    model = _tiny_model()
    seq = load_config(None, ["sequential.steps=2", "sequential.batch_size=3"]).sequential
    with pytest.raises(ValueError, match="expected steps × batch_size = 6"):
        sequential.run_stream(FakeEditor(model), model, [_record(0)], RecordingScorer(), seq, NullTracker())


# ---- a trained hypernetwork -------------------------------------------------------------------------------
@pytest.mark.parametrize("memory", [False, True])
def test_hypernet_stream_equals_editing_one_step_at_a_time_by_hand(
    memory, checkpoint_dir, data_file, tmp_path
):
    from horse_dist.data import tokenize_examples
    from horse_dist.editor.memory import RidgeMemory, remembered_step
    from horse_dist.lifelong.editors import build_editor
    from horse_dist.lm.load import load_frozen_lm
    from horse_dist.lm.registry import module_shape
    from horse_dist.training.assembly import build_engine
    from horse_dist.training.checkpoint import load_checkpoint
    from horse_dist.training.engine import EditBatches

    overrides = _seq_overrides(checkpoint_dir, data_file, tmp_path, **{"sequential.ridge_memory": memory})
    cfg, state = sequential.prepare_config(None, overrides)
    model, tokenizer = load_frozen_lm(cfg.model.source)
    editor = build_editor(cfg, model, tokenizer, state)
    assert editor.name == "horse" and editor.module_names == load_checkpoint(checkpoint_dir)["edit_modules"]
    before = {n: model.get_submodule(n).weight.detach().clone() for n in editor.module_names}
    records, _ = sequential.stream_pool(cfg, tokenizer)
    order = sequential.stream_order(len(records), 6, cfg.sequential.seed)
    stream = [records[i] for i in order]
    sequential.run_stream(editor, model, stream, RecordingScorer(), cfg.sequential, NullTracker())

    engine, _ = build_engine(cfg)  # a fresh copy of the unedited model
    engine.bank.load_state_dict(state["hypernet"])
    names, totals = engine.module_names, None
    memories = [RidgeMemory.empty(*module_shape(engine.model.get_submodule(n))) for n in names]
    for start in range(0, 6, 2):
        step = stream[start : start + 2]
        shifts, _ = apply_edits(engine, tokenizer, [(r.prompt, r.answer) for r in step])
        if not memory:
            apply_shifts_(engine.model, dict(zip(names, shifts)))
            continue
        # the step's own solve on the unedited model, then the solve of every edit so far (editor/memory.py)
        examples = tokenize_examples(
            tokenizer, [r.prompt for r in step], [r.answer for r in step], engine.stop_id
        )
        keys = engine.cache(EditBatches(engine.micro_batches(examples), [], [], len(step))).keys
        for i, (keys_NI, shift_IO) in enumerate(zip(keys, shifts)):
            ridge = float(engine.bank.log_lambda(i).detach().double().exp())
            memories[i], _ = remembered_step(memories[i], keys_NI, shift_IO, ridge)
        totals = [m.total_IO.float() for m in memories]
    if memory:
        apply_shifts_(engine.model, dict(zip(names, totals)))
    for name in editor.module_names:
        edited = model.get_submodule(name).weight
        by_hand = engine.model.get_submodule(name).weight
        assert not torch.allclose(edited, before[name]), f"{name} was not edited"
        torch.testing.assert_close(
            edited,
            by_hand,
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, name=name: f"{name} differs from by hand: {m}",
        )


def test_a_key_prior_editor_streams_with_its_memory_in_whitened_space(tiny_dir, data_file, tmp_path):
    from horse_dist.lifelong.editors import build_editor
    from horse_dist.lm.load import load_frozen_lm

    prior_overrides = {
        "model.source": str(tiny_dir),
        "model.n_edit_layers": 2,
        "method.rank": 16,
        "method.chunk_rows": 16,
        "method.eta_init": 1e-2,
        "method.key_prior": "c0",
        "method.prior_keys": "unrelated_answers",
        **_data_overrides(data_file),
        "train.steps": 1,
        "train.eval_n_edits": 8,
        "train.eval_batches": 1,
        "train.eval_live": False,
        "train.out_dir": str(tmp_path),
        "train.run_name": "prior",
        "tracking.enabled": False,
    }
    train.main([f"{k}={v}" for k, v in prior_overrides.items()])
    weights = {}
    for memory in (True, False):
        overrides = _seq_overrides(
            tmp_path / "prior", data_file, tmp_path, **{"sequential.ridge_memory": memory}
        )
        cfg, state = sequential.prepare_config(None, overrides)
        model, tokenizer = load_frozen_lm(cfg.model.source)
        editor = build_editor(cfg, model, tokenizer, state)
        records, _ = sequential.stream_pool(cfg, tokenizer)
        editor.edit(records[:2])
        first = {n: model.get_submodule(n).weight.detach().clone() for n in editor.module_names}
        editor.edit(records[2:4])
        weights[memory] = (
            first,
            {n: model.get_submodule(n).weight.detach().clone() for n in editor.module_names},
        )
    for name in weights[True][0]:
        # one step: the memory's solve is the step's own (T_1 = S_1), mapped back to raw keys alike
        torch.testing.assert_close(weights[True][0][name], weights[False][0][name], rtol=1e-5, atol=1e-6)
        # a second step: the memory re-solves all four edits, unlike a plain second shift
        assert not torch.allclose(weights[True][1][name], weights[False][1][name], rtol=1e-4, atol=1e-6)


def test_main_logs_curves_and_plot_to_mlflow(checkpoint_dir, data_file, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = sequential.main(
        _seq_overrides(checkpoint_dir, data_file, tmp_path, **{"tracking.enabled": True, "tracking.uri": uri})
    )
    run_dir = tmp_path / "seq"
    on_disk = json.loads((run_dir / "sequential.json").read_text())
    assert on_disk["metrics"] == pytest.approx(summary["metrics"])
    assert on_disk["n_edits"] == 6 and len(on_disk["pool_indices"]) == 6
    assert (run_dir / "sequential.png").stat().st_size > 1000
    for key in (
        "eval/edited/ES",
        "eval/edited/GS",
        "eval/edited/LS",
        "eval/unedited/ES",
        "eval/edited/retention_ES",
    ):
        assert 0.0 <= summary["metrics"][key] <= 1.0, key

    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "seq" and run.info.status == "FINISHED"
    assert run.data.tags["mode"] == "sequential" and run.data.params["sequential.batch_size"] == "2"
    # only the sections a stream reads: train for its run folder and live token counts, not the bench's
    assert {k.split(".")[0] for k in run.data.params} == set(JOB_SECTIONS["sequential"])
    assert "bench" not in JOB_SECTIONS["sequential"] and run.data.params["train.eval_new_tokens"] == "12"
    history = lambda key: [m.step for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history("retention/ES") == [2, 4, 6]  # curve points after steps 1, 2, 3 of b=2
    assert history("stream/ES") == history("stream/GS") == history("locality/LS") == [2, 4, 6]
    assert history("retention/live_ES") == history("stream/live_ES") == [2, 4, 6]
    assert (
        len(on_disk["curves"]["retention_live_ES"]) == 4 and on_disk["curves"]["retention_live_ES"][0] is None
    )
    for key in (
        "eval/unedited/live_ES",
        "eval/edited/live_ES",
        "eval/edited/live_GS",
        "eval/edited/loops_edit",
        "eval/edited/entropy_edit",
    ):
        assert history(key) == [6], key
    assert 0.0 <= summary["metrics"]["eval/edited/loc_gen_same"] <= 1.0
    assert "eval/unedited/loc_gen_same" not in summary["metrics"]  # 1 by definition: the reference itself
    for name in on_disk["module_names"]:
        assert history(f"weight/{name}/norm") == [0, 2, 4, 6]
        values = [m.value for m in client.get_metric_history(run.info.run_id, f"weight/{name}/cond")]
        assert values == pytest.approx(on_disk["curves"]["weights"][name]["cond"])
    assert history("eval/edited/ES") == [6] and history("perf/step_s") == [2, 4, 6]
    assert history("editor/predict_seconds") == [2, 4, 6]
    assert history("made/ES") == history("made/live_ES") == [2, 4, 6]  # every step's own edits
    made_live = [m.value for m in client.get_metric_history(run.info.run_id, "made/live_ES")]
    assert summary["metrics"]["eval/edited/live_ES_when_made"] == pytest.approx(sum(made_live) / 3)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/sequential.png" in artifacts
    assert "sequential.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    with pytest.raises(ConfigError, match="already holds a sequential run"):
        sequential.main(_seq_overrides(checkpoint_dir, data_file, tmp_path))


def test_compare_tabulates_and_overlays_finished_runs(tmp_path, capsys):
    model = _tiny_model()
    seq = load_config(None, ["sequential.steps=2", "sequential.batch_size=1"]).sequential
    result = sequential.run_stream(
        FakeEditor(model), model, [_record(0), _record(1)], RecordingScorer(), seq, NullTracker()
    )
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sequential.json").write_text(json.dumps(result.summary))
    sequential.main(
        ["compare", str(tmp_path / "a"), str(tmp_path / "b" / "sequential.json"), f"out={tmp_path / 'c.png'}"]
    )
    assert (tmp_path / "c.png").stat().st_size > 1000
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("fake b=1")]
    assert len(lines) == 2 and "0.500" in lines[0]  # final ES of the even/odd scorer
    with pytest.raises(FileNotFoundError, match="no sequential summary"):
        sequential.main(["compare", str(tmp_path / "missing")])
    figure = sequential.plot_sequential([result.summary])
    norm_axis = figure.axes[0]
    layers = [sequential.layer_label(name) for name in result.summary["curves"]["weights"]]
    assert [t.get_text() for t in norm_axis.get_legend().get_texts()] == [f"fake b=1 {n}" for n in layers]
    assert layers and all(n.startswith("layer ") for n in layers)  # a line per layer, each named
    for axis in figure.axes:  # edits are counted: no tick between two whole numbers
        figure.canvas.draw()
        assert all(float(t).is_integer() for t in axis.get_xticks()), axis.get_xticks()


# ---- errors -----------------------------------------------------------------------------------------------
def test_bad_method_and_missing_or_mismatched_checkpoint_are_clear_errors(
    checkpoint_dir, data_file, tmp_path
):
    with pytest.raises(ConfigError, match=r"sequential.method='rome' is not one of"):
        sequential.prepare_config(None, ["sequential.method=rome"])
    with pytest.raises(ConfigError, match=r"sequential.method='horse' needs sequential.checkpoint="):
        sequential.prepare_config(None, ["sequential.method=horse"])
    with pytest.raises(ConfigError, match=r"sequential.checkpoint=.*checkpoint not found"):
        sequential.prepare_config(
            None, ["sequential.method=malmen", f"sequential.checkpoint={tmp_path / 'nope'}"]
        )
    with pytest.raises(ConfigError, match=r"holds a 'horse' hypernetwork, but sequential.method='malmen'"):
        sequential.prepare_config(
            None, ["sequential.method=malmen", f"sequential.checkpoint={checkpoint_dir}"]
        )
    with pytest.raises(ConfigError, match="sequential.steps must be positive"):
        sequential.prepare_config(None, ["sequential.steps=0"])
    with pytest.raises(ConfigError, match=r"sequential.pool='test' is not one of"):
        sequential.prepare_config(None, ["sequential.pool=test"])


def test_a_stream_longer_than_the_pool_is_refused(checkpoint_dir, data_file, tmp_path):
    cfg, state = sequential.prepare_config(
        None, _seq_overrides(checkpoint_dir, data_file, tmp_path, **{"sequential.steps": 17})
    )
    with pytest.raises(ConfigError, match="needs 34 distinct edits but the pool holds 32"):
        sequential.run(cfg, state)


# ---- locate-then-edit methods (horse_dist.locate + horse_dist.keystats) ------------------------------------
def _locate_overrides(tmp_path: Path) -> dict:
    """Key statistics in this process (no Ray) from 2000 tokens, layers 1-2 of the tiny model, short value
    optimisation, outputs under tmp_path."""
    return {
        "keystats.num_workers": 0,
        "keystats.cache_dir": str(tmp_path / "keystats"),
        "keystats.max_tokens": 2000,
        "locate.layers": "[1,2]",
        "locate.v_steps": 5,
        "train.out_dir": str(tmp_path),
        "tracking.enabled": False,
    }


@pytest.mark.parametrize("method", ["mose", "memit", "alphaedit"])
def test_locate_stream_on_the_tiny_model(method, tiny_dir, data_file, tmp_path):
    pytest.importorskip("horse_dist.locate")
    overrides = {
        "sequential.method": method,
        "model.source": str(tiny_dir),
        "sequential.steps": 3,
        "sequential.batch_size": 1,
        "sequential.eval_every": 1,
        "sequential.run_name": method,
        **_data_overrides(data_file),
        **_locate_overrides(tmp_path),
    }
    summary = sequential.main([f"{k}={v}" for k, v in overrides.items()])
    assert summary["method"] == method and summary["n_edits"] == 3
    weights = summary["curves"]["weights"]
    assert set(weights) == {f"model.layers.{i}.mlp.down_proj" for i in range(4)}  # layers 1, 2 ± 1
    changed = [
        n
        for n, w in weights.items()
        if abs(w["norm"][-1] - w["norm"][0]) > 0 or w["cond"][-1] != w["cond"][0]
    ]
    assert changed, "no weight was edited"
    metrics = summary["metrics"]
    if method == "mose":  # an orthogonal left-multiplication keeps both, to float64 solve precision
        assert (
            metrics["eval/edited/max_norm_rel_change"] < 1e-6
            and metrics["eval/edited/max_cond_rel_change"] < 1e-6
        )
    elif method == "memit":  # MEMIT's additive update moves them
        assert metrics["eval/edited/max_cond_rel_change"] > 1e-4


def test_counterfact_stream_reports_contrast_scores(tiny_dir, tmp_path):
    pytest.importorskip("horse_dist.locate")
    records = json.loads((HEAD_FILE.parents[1] / "counterfact/counterfact_head.json").read_text())[:16]
    data_file = tmp_path / "cf16.json"
    data_file.write_text(json.dumps(records))
    overrides = {
        "sequential.method": "memit",
        "model.source": str(tiny_dir),
        "sequential.steps": 2,
        "sequential.batch_size": 2,
        "sequential.eval_every": 2,
        "sequential.run_name": "cf",
        "data": "counterfact",
        "data.train_path": str(data_file),
        "data.eval_size": 8,
        **_locate_overrides(tmp_path),
    }
    summary = sequential.main([f"{k}={v}" for k, v in overrides.items()])
    metrics = summary["metrics"]
    for row in ("eval/unedited", "eval/edited"):
        for name in ("efficacy", "paraphrase", "neighbourhood"):
            assert metrics[f"{row}/cf_{name}"] in (0.0, 0.25, 0.5, 0.75, 1.0), (row, name)  # 4 edits
            assert -1.0 <= metrics[f"{row}/cf_{name}_mag"] <= 1.0
    assert (
        metrics["eval/edited/cf_efficacy_mag"] > metrics["eval/unedited/cf_efficacy_mag"]
    )  # the edits moved P(new)
    assert "CF eff" in sequential.format_table([summary])
