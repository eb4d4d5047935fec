"""End to end on a tiny random Llama: training, resume, tracking, editing and export."""

import json
from pathlib import Path

import pytest
import torch
from run_helpers import tmp_tracking
from transformers import AutoModelForCausalLM

from horse_dist import edit, evaluate, train
from horse_dist.config import config_from_yaml
from horse_dist.data import tokenize_example
from horse_dist.lm.passes import answer_logits
from horse_dist.training.assembly import build_engine
from horse_dist.training.checkpoint import RunFolderError, load_checkpoint
from horse_dist.training.edit_call import apply_edits

HEAD_FILE = Path(__file__).resolve().parent.parent / "data/zsre/zsre_mend_eval_head.json"


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    """64 real zsRE records; training and evaluation both use them (ES on the training edits)."""
    path = tmp_path_factory.mktemp("data") / "zsre64.json"
    path.write_text(json.dumps(json.loads(HEAD_FILE.read_text())[:64]))
    return path


@pytest.fixture
def tiny_overrides(tiny_dir: Path, train_file: Path):
    def make(out_dir: Path, **extra) -> list[str]:
        return _overrides(tiny_dir, train_file, out_dir, **extra)

    return make


def _overrides(tiny_dir: Path, train_file: Path, out_dir: Path, **extra) -> list[str]:
    base = {
        "model.source": str(tiny_dir),
        "model.n_edit_layers": 2,
        "method.rank": 16,
        "method.chunk_rows": 16,
        "method.eta_init": 1e-2,  # the tiny model's edits need eta ~ 1 (a scan), so training has to find it
        "data.n_edits": 8,
        "data.batch_size": 4,
        "data.train_path": str(train_file),
        "data.eval_path": str(train_file),
        "train.meta_lr": 3e-2,
        "train.eval_n_edits": 16,
        "train.eval_batches": 2,
        "train.out_dir": str(out_dir),
        "tracking.enabled": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_training_raises_edit_success_on_the_training_edits(tiny_overrides, tmp_path):
    untrained = train.main(tiny_overrides(tmp_path, **{"train.steps": 0, "train.run_name": "s0"}))
    trained = train.main(tiny_overrides(tmp_path, **{"train.steps": 12, "train.run_name": "s12"}))
    assert untrained["unedited/ES"] == pytest.approx(trained["unedited/ES"])
    assert trained["edited/ES"] > untrained["edited/ES"] + 0.15
    assert trained["edited/ES"] > trained["unedited/ES"] + 0.15
    results = json.loads((tmp_path / "s12" / "results.json").read_text())
    assert results["edited/ES"] == pytest.approx(trained["edited/ES"])
    assert results["median_step_seconds"] > 0


def test_resume_gives_the_same_hypernetwork_as_an_uninterrupted_run(tiny_overrides, tmp_path):
    common = {"train.checkpoint_every": 2, "train.eval_batches": 1}
    train.main(tiny_overrides(tmp_path, **common, **{"train.steps": 4, "train.run_name": "full"}))
    train.main(tiny_overrides(tmp_path, **common, **{"train.steps": 2, "train.run_name": "split"}))
    assert load_checkpoint(tmp_path / "split")["step"] == 2
    train.main(
        tiny_overrides(
            tmp_path,
            **common,
            **{"train.steps": 4, "train.run_name": "split", "train.resume": True},
        )
    )
    full, split = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    assert full["step"] == split["step"] == 4
    assert full["hypernet"].keys() == split["hypernet"].keys()
    for key, value in full["hypernet"].items():
        assert torch.equal(value, split["hypernet"][key]), key
    assert full["optimizer"]["state"].keys() == split["optimizer"]["state"].keys()
    for index, state in full["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], split["optimizer"]["state"][index]["exp_avg"])


def test_reusing_a_run_name_without_resume_is_refused(tiny_overrides, tmp_path):
    train.main(tiny_overrides(tmp_path, **{"train.steps": 1, "train.run_name": "once"}))
    with pytest.raises(RunFolderError, match="already holds a run"):
        train.main(tiny_overrides(tmp_path, **{"train.steps": 1, "train.run_name": "once"}))


def test_tracking_to_sqlite_logs_params_and_step_metrics(tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train.main(
        tiny_overrides(
            tmp_path,
            **{
                "train.steps": 3,
                "train.run_name": "tracked",
                "tracking.enabled": True,
                "tracking.uri": uri,
                "data.max_train_records": 16,  # 2 meta-steps an epoch: step 3 revisits step 1's or 2's records
            },
        )
    )
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["method.spread"] == "orthogonal" and run.data.params["data.n_edits"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/gen_loss")] == [1, 2, 3]
    assert "eval/edited/ES" in run.data.metrics and "perf/cache_s" in run.data.metrics
    # Epoch 1 stores every prompt's block inputs; epoch 2 is served from them.
    history = client.get_metric_history(run.info.run_id, "perf/block_cache/epoch_hit_rate")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [0.0, 0.0, 1.0]
    assert run.data.metrics["perf/block_cache/megabytes"] > 0


def test_edit_export_reloads_in_plain_transformers_with_the_edited_predictions(tiny_overrides, tmp_path):
    train.main(tiny_overrides(tmp_path, **{"train.steps": 3, "train.run_name": "for_edit"}))
    requests = [
        {"prompt": "What university did Watts Humphrey attend?", "answer": "Harvard University"},
        {"prompt": "Which family does Epaspidoceras belong to?", "answer": "Aspidoceratidae"},
        {"prompt": "Who is the mother of Kyo Nakagawa?", "answer": "Yoko Ono"},
    ]
    edits_file = tmp_path / "edits.json"
    edits_file.write_text(json.dumps(requests))
    out_dir = tmp_path / "edited"
    timings = edit.main([f"checkpoint={tmp_path / 'for_edit'}", f"edits={edits_file}", f"out={out_dir}"])
    assert timings["edit_seconds"] > 0 and 0.0 <= timings["edit_success"] <= 1.0

    state = load_checkpoint(tmp_path / "for_edit")
    engine, tokenizer = build_engine(config_from_yaml(state["config"], []))
    engine.bank.load_state_dict(state["hypernet"])
    shifts, _ = apply_edits(engine, tokenizer, [(r["prompt"], r["answer"]) for r in requests])
    batches = engine.micro_batches([tokenize_example(tokenizer, r["prompt"], r["answer"]) for r in requests])
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    metadata = json.loads((out_dir / "edit_metadata.json").read_text())
    assert metadata["n_edits"] == 3 and metadata["edited_modules"] == engine.module_names
    with torch.no_grad():
        for batch in batches:
            with engine.hooks.shifted(shifts):
                hooked = answer_logits(engine.model, batch)
            merged = answer_logits(reloaded, batch)
            torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-4)
            assert torch.equal(merged.argmax(-1), hooked.argmax(-1))
            assert not torch.allclose(answer_logits(engine.model, batch), hooked)


def test_evaluate_cli_matches_the_training_run_evaluation(tiny_overrides, tmp_path):
    trained = train.main(tiny_overrides(tmp_path, **{"train.steps": 2, "train.run_name": "ev"}))
    again = evaluate.main([f"checkpoint={tmp_path / 'ev'}", "data.n_edits=16", *tmp_tracking(tmp_path)])
    for key in ("edited/ES", "edited/GS", "edited/LS", "unedited/ES", "edited/loc_agreement"):
        assert again[key] == pytest.approx(trained[key], abs=1e-6), key


def test_evaluate_needs_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="checkpoint=PATH"):
        evaluate.main(["data.n_edits=8"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate.main([f"checkpoint={tmp_path / 'missing'}"])


def test_micro_batch_size_changes_speed_not_results(tiny_overrides, tmp_path):
    """data.micro_batch_size regroups the LM passes (large groups fill a GPU); data.batch_size stays the loss
    normaliser, so the trained hypernetwork is the same up to fp32 summation order."""
    finals = {}
    for rows in (1, 8):
        out = tmp_path / f"rows{rows}"
        train.main(
            tiny_overrides(out, **{"train.steps": 2, "data.micro_batch_size": rows, "train.run_name": "r"})
        )
        finals[rows] = load_checkpoint(out / "r")["hypernet"]
    for key, value in finals[8].items():
        torch.testing.assert_close(value, finals[1][key], rtol=1e-4, atol=1e-6, msg=key)
