"""Model selection on a validation split carved from the training pool (train.val_size)."""

import json
from pathlib import Path

import pytest
import torch
from run_helpers import tmp_tracking

from horse_dist import evaluate, train
from horse_dist.config import ConfigError, load_config
from horse_dist.data import EditRecord, TokenizedExample, TokenizedRecords
from horse_dist.training.assembly import DataPools
from horse_dist.training.checkpoint import load_checkpoint
from horse_dist.training.selection import ModelSelection, hold_out_validation, validation_score

HEAD_FILE = Path(__file__).resolve().parent.parent / "data/zsre/zsre_mend_eval_head.json"


def test_validation_score_by_hand():
    result = {"edited/ES": 0.9, "edited/GS": 0.6, "edited/loc_agreement": 0.3}
    assert validation_score(result) == pytest.approx(0.6)
    live = {
        **result,
        "edited/live_ES": 0.8,
        "edited/live_GS": 0.4,
        "edited/loc_gen_same": 0.1,
        "edited/entropy_edit": 1.0,  # half the unedited model's: 0.5
        "edited/entropy_unrel": 3.0,  # above the unedited model's: capped at 1
        "unedited/entropy_edit": 2.0,
        "unedited/entropy_unrel": 2.5,
    }
    assert validation_score(live) == pytest.approx((0.9 + 0.6 + 0.3 + 0.8 + 0.4 + 0.1 + 0.5 + 1.0) / 8)


def test_selection_keeps_the_best_finite_score():
    net = torch.nn.Linear(2, 2)
    selection = ModelSelection()
    assert selection.offer(0.5, 2, net)
    kept = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not selection.offer(0.4, 4, net) and not selection.offer(float("nan"), 6, net)
    assert selection.step == 2 and selection.score == 0.5
    selection.restore_best(net)
    assert torch.equal(net.weight, kept)
    with pytest.raises(RuntimeError, match="nothing to select"):
        ModelSelection().restore_best(net)


def _pools(n: int) -> DataPools:
    records = [EditRecord(f"p{i}", f"a{i}", f"r{i}", f"l{i}", f"la{i}") for i in range(n)]
    example = [TokenizedExample([i], [i]) for i in range(n)]
    tokenized = TokenizedRecords(example, list(example), list(example))
    return DataPools(records, [], tokenized, tokenized)


def test_the_validation_split_is_held_out_of_training_and_seeded():
    train_pools, val = hold_out_validation(_pools(20), 5, seed=3)
    trained_on = [r.prompt for r in train_pools.train_records]
    held = [e.input_ids[0] for e in val.edit]
    assert len(trained_on) == 15 and len(held) == 5
    assert not {f"p{i}" for i in held} & set(trained_on)
    assert [e.input_ids[0] for e in train_pools.train.edit] == [int(p[1:]) for p in trained_on]
    assert held == [e.input_ids[0] for e in hold_out_validation(_pools(20), 5, seed=3)[1].edit]
    with pytest.raises(ConfigError, match="train.val_size=20 leaves no training records"):
        hold_out_validation(_pools(20), 20, seed=3)


def test_val_size_needs_eval_every():
    with pytest.raises(ConfigError, match="train.val_size > 0 .* set train.eval_every > 0"):
        load_config(None, ["train.val_size=8"])


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "zsre48.json"
    path.write_text(json.dumps(json.loads(HEAD_FILE.read_text())[:48]))
    return path


def _args(tiny_dir: Path, data: Path, out: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [
        f"model.source={tiny_dir}",
        "model.n_edit_layers=2",
        "method.rank=16",
        "method.chunk_rows=16",
        "method.eta_init=1e-2",
        "data.n_edits=8",
        "data.batch_size=4",
        f"data.train_path={data}",
        f"data.eval_path={data}",
        "train.meta_lr=3e-2",
        f"train.steps={steps}",
        "train.eval_every=1",
        "train.checkpoint_every=2",
        "train.val_size=16",
        "train.eval_n_edits=8",
        "train.eval_batches=1",
        "train.val_batches=2",
        "train.eval_new_tokens=4",
        "train.eval_loc_tokens=4",
        f"train.out_dir={out}",
        f"train.run_name={name}",
        *extra,
    ]


def test_a_run_reports_and_saves_its_best_validated_editor(tiny_dir, data_file, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train.main(_args(tiny_dir, data_file, tmp_path, "sel", 4, f"tracking.uri={uri}"))
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/score")}
    assert sorted(history) == [1, 2, 3, 4]
    best_step = max(history, key=lambda s: (history[s], -s))  # the first of equal scores
    assert result["selected_step"] == best_step and result["val_score"] == pytest.approx(history[best_step])
    assert "val/edited/live_ES" in run.data.metrics

    best, last = load_checkpoint(tmp_path / "sel" / "best.pt"), load_checkpoint(tmp_path / "sel")
    assert best["step"] == best_step and last["step"] == 4 and last["selection"]["step"] == best_step
    for key, value in best["hypernet"].items():
        assert torch.equal(value, last["selection"]["hypernet"][key]), key
    # the run's final evaluation scored the selected editor: best.pt evaluates to the same numbers
    again = evaluate.main(
        [f"checkpoint={tmp_path / 'sel' / 'best.pt'}", "train.eval_untrained=false", *tmp_tracking(tmp_path)]
    )
    assert again["edited/ES"] == pytest.approx(result["edited/ES"], abs=1e-6)
    assert again["edited/live_ES"] == pytest.approx(result["edited/live_ES"], abs=1e-6)


def test_a_resumed_run_selects_as_an_uninterrupted_one(tiny_dir, data_file, tmp_path):
    off = "tracking.enabled=false"
    full = train.main(_args(tiny_dir, data_file, tmp_path, "full", 4, off))
    train.main(_args(tiny_dir, data_file, tmp_path, "split", 2, off))
    split = train.main(_args(tiny_dir, data_file, tmp_path, "split", 4, off, "train.resume=true"))
    assert split["selected_step"] == full["selected_step"]
    assert split["val_score"] == pytest.approx(full["val_score"], abs=1e-9)
    assert split["edited/ES"] == pytest.approx(full["edited/ES"], abs=1e-9)
