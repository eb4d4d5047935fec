"""Bad inputs and faults as a new user meets them (issue 15): nothing is lost, every error is one line.

Each case runs a command the way `python -m horse_dist.<command>` does (`run_cli`: exit code 2 and one
`error:` line on stderr for bad input; 1 for a diverged run or a failing disk), on a tiny random Llama.
"""

import errno
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from horse_dist import edit, evaluate, train
from horse_dist.cli import run_cli
from horse_dist.training import loop
from horse_dist.training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    RunFolderLock,
    atomic_write,
    history,
    load_checkpoint,
    load_run_checkpoint,
    save_run_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
HEAD_FILE = REPO_ROOT / "data/zsre/zsre_mend_eval_head.json"
ROME_RECORD = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English"},
        "target_true": {"str": "French"},
    },
    "paraphrase_prompts": ["Danielle Darrieux spoke"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "zsre32.json"
    path.write_text(json.dumps(json.loads(HEAD_FILE.read_text())[:32]))
    return path


def tiny_args(tiny_dir: Path, data_file: Path, out_dir: Path, **extra) -> list[str]:
    base = {
        "model.source": str(tiny_dir),
        "model.n_edit_layers": 2,
        "method.rank": 16,
        "method.chunk_rows": 16,
        "data.n_edits": 8,
        "data.batch_size": 4,
        "data.train_path": str(data_file),
        "data.eval_path": str(data_file),
        "train.steps": 2,
        "train.eval_n_edits": 8,
        "train.eval_batches": 1,
        "train.eval_live": False,
        "train.eval_untrained": False,
        "train.out_dir": str(out_dir),
        "tracking.enabled": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cli(main, args: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `main` run as its `python -m` entry point runs it."""
    capsys.readouterr()
    try:
        run_cli(main, args)
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tiny_dir, data_file, tmp_path_factory) -> Path:
    """A trained run folder every case below may read (and must never damage)."""
    out = tmp_path_factory.mktemp("runs")
    train.main(tiny_args(tiny_dir, data_file, out, **{"train.run_name": "base", "train.checkpoint_every": 1}))
    return out / "base"


@pytest.fixture
def edits_file(tmp_path) -> Path:
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([{"prompt": "The capital of France is", "answer": "Rome"}]))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- data loss -------------------------------------------------------------------------------------------
def test_edit_refuses_a_non_empty_out_folder_and_keeps_it(base_run, edits_file, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my work")
    code, err = cli(edit.main, [f"checkpoint={base_run}", f"edits={edits_file}", f"out={out}"], capsys)
    assert code == 2 and "not empty; pass overwrite=true" in one_error_line(err)
    code, err = cli(
        edit.main, [f"checkpoint={base_run}", f"edits={edits_file}", f"out={out}", "overwrite=true"], capsys
    )
    assert code == 2 and "not an edited model written by horse_dist.edit" in one_error_line(err)
    assert (out / "notes.txt").read_text() == "my work"


@pytest.mark.parametrize("target", ["checkpoint_folder", "working_folder", "parent_of_checkpoint"])
def test_edit_never_writes_over_the_checkpoint_or_the_working_folder(
    base_run, edits_file, target, capsys, monkeypatch
):
    out = {
        "checkpoint_folder": base_run,
        "working_folder": Path("."),
        "parent_of_checkpoint": base_run.parent,
    }
    monkeypatch.chdir(base_run.parent if target == "working_folder" else REPO_ROOT)
    before = snapshot(base_run)
    code, err = cli(
        edit.main,
        [f"checkpoint={base_run}", f"edits={edits_file}", f"out={out[target]}", "overwrite=true"],
        capsys,
    )
    assert code == 2 and "refusing to write over" in one_error_line(err)
    assert snapshot(base_run) == before


def test_edit_overwrite_replaces_an_earlier_export(base_run, edits_file, tmp_path, capsys):
    out = tmp_path / "edited"
    args = [f"checkpoint={base_run}", f"edits={edits_file}", f"out={out}"]
    assert cli(edit.main, args, capsys)[0] == 0
    (out / "stale.txt").write_text("from the first export")
    assert cli(edit.main, [*args, "overwrite=true"], capsys)[0] == 0
    assert not (out / "stale.txt").exists() and (out / "edit_metadata.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "edits.json"]  # nothing left beside


def test_non_finite_steps_are_skipped_and_never_saved(tiny_dir, data_file, tmp_path, capsys):
    args = tiny_args(
        tiny_dir,
        data_file,
        tmp_path,
        **{
            "train.run_name": "nan",
            "train.steps": 5,
            "train.checkpoint_every": 1,
            "method.log_lambda_init": -100,
        },
    )
    code, err = cli(train.main, args, capsys)
    line = one_error_line(err)
    assert code == 1 and "3 meta-steps in a row (up to step 3) had a non-finite loss or gradient" in line
    saved = [load_checkpoint(p) for p in history(tmp_path / "nan")]
    assert [s["step"] for s in saved] == [1, 2]  # the skipped steps left the (finite) initial weights
    for state in saved:
        assert all(bool(torch.isfinite(v).all()) for v in state["hypernet"].values() if v.is_floating_point())


def test_a_non_finite_checkpoint_is_refused_and_the_last_good_one_kept(tmp_path):
    good = {
        "format": "horse_dist.checkpoint.v1",
        "step": 1,
        "hypernet": {"w": torch.ones(2)},
        "optimizer": None,
    }
    save_run_checkpoint(good, tmp_path, keep=2)
    bad = {**good, "step": 2, "hypernet": {"w": torch.tensor([1.0, float("nan")])}}
    with pytest.raises(CheckpointError, match=r"hypernet\.w is not finite"):
        save_run_checkpoint(bad, tmp_path, keep=2)
    assert load_checkpoint(tmp_path)["step"] == 1


def test_keep_checkpoints_keeps_the_newest_n_as_hard_links(tmp_path):
    for step in range(1, 5):
        state = {
            "format": "horse_dist.checkpoint.v1",
            "step": step,
            "hypernet": {"w": torch.full((2,), step)},
        }
        save_run_checkpoint(state, tmp_path, keep=2)
    assert [p.name for p in history(tmp_path)] == ["step-000003.pt", "step-000004.pt"]
    assert os.path.samefile(tmp_path / CHECKPOINT_NAME, tmp_path / "checkpoints" / "step-000004.pt")
    # a damaged newest file (checkpoint.pt and its step file are one inode): resume takes the one before
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"torn")
    assert load_run_checkpoint(tmp_path)["step"] == 3


def test_a_run_folder_in_use_is_refused(tiny_dir, data_file, tmp_path, capsys):
    (tmp_path / "dup").mkdir()
    lock = RunFolderLock(tmp_path / "dup").acquire()
    try:
        code, err = cli(
            train.main, tiny_args(tiny_dir, data_file, tmp_path, **{"train.run_name": "dup"}), capsys
        )
    finally:
        lock.release()
    assert code == 2 and f"is in use by another run (pid {os.getpid()})" in one_error_line(err)
    assert not (tmp_path / "dup" / CHECKPOINT_NAME).exists()


def test_resume_refuses_a_changed_config_unless_overridden(base_run, tiny_dir, data_file, capsys):
    out = base_run.parent
    common = {"train.run_name": "base", "train.resume": True, "train.steps": 3, "train.checkpoint_every": 1}
    before = snapshot(base_run)
    code, err = cli(
        train.main, tiny_args(tiny_dir, data_file, out, **common, **{"train.meta_lr": 1.0}), capsys
    )
    assert code == 2 and "train.meta_lr: 0.0001 -> 1.0); set train.resume_override=true" in one_error_line(
        err
    )
    code, err = cli(train.main, tiny_args(tiny_dir, data_file, out, **common, **{"method.rank": 8}), capsys)
    assert code == 2 and "cannot resume with a different method.rank" in one_error_line(err)
    assert snapshot(base_run) == before  # config.yaml included
    override = {"train.meta_lr": 0.5, "train.resume_override": True}
    assert cli(train.main, tiny_args(tiny_dir, data_file, out, **common, **override), capsys)[0] == 0
    state = load_checkpoint(base_run)
    assert state["step"] == 3 and state["optimizer"]["param_groups"][0]["lr"] == 0.5
    assert "meta_lr: 0.5" in (base_run / "config.yaml").read_text()


def test_resume_of_a_run_that_does_not_exist_is_refused(tiny_dir, data_file, tmp_path, capsys):
    args = tiny_args(tiny_dir, data_file, tmp_path, **{"train.run_name": "never", "train.resume": True})
    code, err = cli(train.main, args, capsys)
    assert code == 2 and "nothing to resume (no checkpoint)" in one_error_line(err)
    assert not (tmp_path / "never").exists()


def test_resume_if_exists_starts_a_new_run_then_continues_it(tiny_dir, data_file, tmp_path, capsys):
    """The k8s LLaMA configs' retry setting: the first attempt starts the run, a retry continues it."""
    args = tiny_args(
        tiny_dir, data_file, tmp_path, **{"train.run_name": "retry", "train.resume_if_exists": True}
    )
    code, _ = cli(train.main, [*args, "train.steps=1"], capsys)
    assert code == 0 and load_run_checkpoint(tmp_path / "retry")["step"] == 1
    code, err = cli(train.main, [*args, "train.steps=2"], capsys)
    assert code == 0, err
    assert load_run_checkpoint(tmp_path / "retry")["step"] == 2


def test_orphaned_temporary_files_are_removed_on_resume(tiny_dir, data_file, tmp_path, capsys):
    args = tiny_args(tiny_dir, data_file, tmp_path, **{"train.run_name": "r", "train.steps": 1})
    train.main(args)
    orphan = tmp_path / "r" / f".{CHECKPOINT_NAME}.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    user_file = tmp_path / "r" / "notes.tmp"
    user_file.write_text("mine")
    assert cli(train.main, [*args, "train.resume=true"], capsys)[0] == 0
    assert not orphan.exists() and user_file.read_text() == "mine"


def test_a_failing_write_names_its_path(tmp_path):
    def full_disk(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "results.json", full_disk)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "results.json")
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


# ---- bad input: one line, exit code 2 ------------------------------------------------------------------------
def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _missing_answer(tmp: Path) -> list[str]:
    edits = write(tmp / "e.json", json.dumps([{"prompt": "a", "answer": "b"}, {"prompt": "c"}]))
    return [f"edits={edits}", f"out={tmp / 'o'}"]


LATIN1 = '[{"src": "caf\xe9"}]'.encode("latin-1")

BAD_TRAIN_INPUTS = {
    "non_utf8_data": (
        lambda tmp: [f"data.train_path={write(tmp / 'latin1.json', LATIN1)}"],
        "latin1.json: not UTF-8 text (byte",
    ),
    "empty_data": (
        lambda tmp: [f"data.train_path={write(tmp / 'empty.json', '[]')}"],
        "empty.json: no edit records",
    ),
    "rome_layout_under_flat": (
        lambda tmp: [
            f"data.train_path={write(tmp / 'rome.json', json.dumps([ROME_RECORD]))}",
            "data.format=counterfact_flat",
        ],
        "this file is in counterfact_rome layout, not counterfact_flat",
    ),
    "too_many_edit_layers": (
        lambda tmp: ["model.n_edit_layers=99"],
        "model.n_edit_layers=99: the model has 4 layers",
    ),
    "negative_max_train_records": (
        lambda tmp: ["data.max_train_records=-1"],
        "data.max_train_records must be >= 0",
    ),
    "negative_checkpoint_every": (
        lambda tmp: ["train.checkpoint_every=-1"],
        "train.checkpoint_every must be >= 0",
    ),
    "misspelt_key": (
        lambda tmp: ["train.stpes=3"],
        "unknown config key 'train.stpes'; did you mean train.steps?",
    ),
    "wrong_type": (
        lambda tmp: ["method.rank=abc"],
        "method.rank: Value 'abc' of type 'str' could not be converted",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN_INPUTS))
def test_bad_training_input_is_one_line_and_exit_code_2(case, tiny_dir, data_file, tmp_path, capsys):
    make, expected = BAD_TRAIN_INPUTS[case]
    args = tiny_args(tiny_dir, data_file, tmp_path / "runs", **{"train.run_name": case}) + make(tmp_path)
    code, err = cli(train.main, args, capsys)
    assert code == 2 and expected in one_error_line(err)
    assert not (tmp_path / "runs" / case / CHECKPOINT_NAME).exists()


def test_an_edits_record_without_an_answer_is_named(base_run, tmp_path, capsys):
    code, err = cli(edit.main, [f"checkpoint={base_run}", *_missing_answer(tmp_path)], capsys)
    assert code == 2 and "e.json: record 1: field 'answer': expected a non-empty string" in one_error_line(
        err
    )


def test_a_foreign_checkpoint_is_named(tmp_path, capsys):
    bogus = write(tmp_path / "checkpoint.pt", b"not a checkpoint")
    code, err = cli(evaluate.main, [f"checkpoint={bogus}"], capsys)
    assert code == 2 and "checkpoint.pt: not a readable horse_dist checkpoint" in one_error_line(err)


def test_debug_shows_the_traceback(tiny_dir, data_file, tmp_path):
    with pytest.raises(Exception, match="unknown config key"):
        run_cli(train.main, [*tiny_args(tiny_dir, data_file, tmp_path), "train.stpes=3", "--debug"])


def test_string_keys_take_yaml_words_verbatim():
    from horse_dist.config import load_config

    assert load_config(None, ["data.target=true", "tracking.experiment=123"]).data.target == "true"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_overlong_records_are_dropped_with_a_count(arch, data_file, tmp_path, caplog, capsys):
    """Llama trained silently past its positions; GPT-2 died with an IndexError in its position embedding."""
    from tiny_models import save_tiny_model

    from horse_dist.config import load_config
    from horse_dist.training.assembly import build_engine, load_data, model_positions

    model_dir = save_tiny_model(tmp_path / arch, arch, seed=0)
    cfg = load_config(None, tiny_args(model_dir, data_file, tmp_path))
    engine, tokenizer = build_engine(cfg)
    positions = model_positions(engine.model)
    assert positions == 256  # both tiny families
    records = json.loads(data_file.read_text())
    records[3]["src"] = "word " * (2 * positions)
    records.append(dict(records[0]))  # a duplicate
    long_file = write(tmp_path / "long.json", json.dumps(records))
    cfg = load_config(None, tiny_args(model_dir, long_file, tmp_path))
    pools = load_data(cfg, tokenizer, positions)
    assert len(pools.train_records) == len(records) - 1
    assert f"dropped 1 record(s) longer than the model's {positions} positions: indices [3]" in caplog.text
    assert "1 record(s) repeat an earlier (prompt, answer); kept" in caplog.text
    code, err = cli(train.main, tiny_args(model_dir, long_file, tmp_path, **{"train.steps": 1}), capsys)
    assert code == 0, err


ENTRY_POINTS = ["train", "evaluate", "edit", "sweep", "sequential", "bench", "keystats.__main__", "bench_ab"]
MISSPELT = ["train.stpes=3"]
ARGS = {
    "bench_ab": ["--variant", "train.steps=1", "--variant", "train.steps=2", *MISSPELT],
    "sweep": ["methods=horse,malmen", *MISSPELT],
}


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_reports_a_misspelt_key_in_one_line(module, capsys):
    main = importlib.import_module(f"horse_dist.{module}").main
    code, err = cli(main, ARGS.get(module, MISSPELT), capsys)
    assert code == 2 and "unknown config key 'train.stpes'; did you mean train.steps?" in one_error_line(err)


@pytest.mark.parametrize("module", ["train", "edit"])
def test_python_m_exits_2_with_one_line(module, tmp_path):
    """The `python -m` wiring itself (run_cli in each module's __main__ block)."""
    done = subprocess.run(
        [sys.executable, "-m", f"horse_dist.{module}", *MISSPELT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "unknown config key 'train.stpes'" in one_error_line(done.stderr)


def test_a_sequential_run_folder_in_use_is_refused(tmp_path, capsys):
    from horse_dist import sequential

    (tmp_path / "stream").mkdir()
    lock = RunFolderLock(tmp_path / "stream").acquire()
    try:
        args = [f"train.out_dir={tmp_path}", "sequential.run_name=stream", "tracking.enabled=false"]
        code, err = cli(sequential.main, args, capsys)
    finally:
        lock.release()
    assert code == 2 and "is in use by another run" in one_error_line(err)
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == [".lock"]


def test_resume_continues_the_saved_config_with_only_the_new_overrides(base_run, capsys):
    """The README's `train.run_name=X train.resume=true train.steps=N`: no need to repeat the run's config."""
    args = [f"train.out_dir={base_run.parent}", "train.run_name=base", "train.resume=true", "train.steps=5"]
    assert cli(train.main, args, capsys)[0] == 0
    assert load_checkpoint(base_run)["step"] == 5
    code, err = cli(train.main, [*args, "method=malmen"], capsys)
    assert code == 2 and "method=malmen: the method is fixed by the checkpoint" in one_error_line(err)


def test_resume_refuses_a_changed_training_file_unless_overridden(tiny_dir, data_file, tmp_path, capsys):
    changed = tmp_path / "zsre32.json"
    changed.write_text(data_file.read_text())
    args = {"train.run_name": "r", "train.steps": 1, "data.eval_path": str(data_file)}
    train.main(tiny_args(tiny_dir, changed, tmp_path, **args))
    saved = load_checkpoint(tmp_path / "r")["data_fingerprint"]
    assert len(saved) == 64
    rows = json.loads(changed.read_text())
    changed.write_text(json.dumps([rows[1], rows[0], *rows[2:]]))  # same records, another order
    resume = {**args, "train.resume": True, "train.steps": 2}
    code, err = cli(train.main, tiny_args(tiny_dir, changed, tmp_path, **resume), capsys)
    line = one_error_line(err)
    assert code == 2 and f"training records differ from the ones this run was trained on ({changed}" in line
    assert "set train.resume_override=true" in line and load_checkpoint(tmp_path / "r")["step"] == 1
    override = {**resume, "train.resume_override": True}
    assert cli(train.main, tiny_args(tiny_dir, changed, tmp_path, **override), capsys)[0] == 0
    assert load_checkpoint(tmp_path / "r")["step"] == 2


def test_run_folders_are_made_in_the_working_folder_never_in_the_checkout(tmp_path, monkeypatch):
    from horse_dist.config import load_config
    from horse_dist.training import assembly

    repo = tmp_path / "repo"
    (repo / "runs").mkdir(parents=True)  # a checkout whose runs/ exists (an earlier quick start)
    monkeypatch.setattr(assembly, "REPO_ROOT", repo)
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.chdir(user)
    cfg = load_config(None, ["train.run_name=mine"])
    assert loop.run_folder(cfg).resolve() == user / "runs" / "mine"
    assert assembly.resolve_path("runs") == repo / "runs"  # inputs still fall back to the bundled files


def test_resume_keeps_the_partition_count_it_started_with(tiny_dir, data_file, tmp_path, capsys):
    """The meta-batches depend on data.partitions: a resume refuses another count, an automatic count (0)
    follows the checkpoint's whatever the new worker count, and the resumed run draws what an uninterrupted
    one draws."""
    from horse_dist.config import load_config
    from horse_dist.dist.world import LocalWorld

    args = {"data.partitions": 2, "train.steps": 1}
    train.main(tiny_args(tiny_dir, data_file, tmp_path, **args, **{"train.run_name": "split"}))
    assert load_checkpoint(tmp_path / "split")["data_partitions"] == 2
    resume = {"train.run_name": "split", "train.resume": True, "train.steps": 3}
    other = {**resume, "data.partitions": 3, "train.resume_override": True}
    code, err = cli(train.main, tiny_args(tiny_dir, data_file, tmp_path, **other), capsys)
    assert code == 2 and "cannot resume with a different data.partitions (data.partitions: 2 -> 3" in err
    assert cli(train.main, tiny_args(tiny_dir, data_file, tmp_path, **resume), capsys)[0] == 0
    whole = {"train.run_name": "whole", "data.partitions": 2, "train.steps": 3}
    train.main(tiny_args(tiny_dir, data_file, tmp_path, **whole))
    resumed, uninterrupted = (load_checkpoint(tmp_path / name)["hypernet"] for name in ("split", "whole"))
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)
    auto = load_config(None, [])
    assert loop.resolve_partitions(auto, LocalWorld(), None) == 1  # one per worker
    assert loop.resolve_partitions(auto, LocalWorld(), {"data_partitions": 4}) == 4  # the checkpoint's
    assert loop.resolve_partitions(auto, LocalWorld(), {}) == 1  # checkpoints before partitions: one


def test_a_resume_maps_the_stored_tokens_instead_of_tokenising(
    tiny_dir, data_file, tmp_path, capsys, monkeypatch
):
    import horse_dist.data.token_store as token_store

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # data.token_store=auto: ~/.cache/horse_dist/tokens
    store = tmp_path / "home" / ".cache" / "horse_dist" / "tokens"
    args = {"train.run_name": "r", "train.steps": 1}
    train.main(tiny_args(tiny_dir, data_file, tmp_path, **args))
    stored = sorted(store.iterdir())  # one pool: the training and evaluation files are one here
    assert [p.name.startswith(".") for p in stored] == [True, False]  # its lock, its folder

    def refuse(*_):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(token_store, "tokenize_records", refuse)
    resume = {**args, "train.resume": True, "train.steps": 2}
    assert cli(train.main, tiny_args(tiny_dir, data_file, tmp_path, **resume), capsys)[0] == 0
    assert load_checkpoint(tmp_path / "r")["step"] == 2 and sorted(store.iterdir()) == stored
    off = {"train.run_name": "off", "data.token_store": "off"}
    with pytest.raises(AssertionError, match="tokenised again"):  # off: tokenised in memory
        train.main(tiny_args(tiny_dir, data_file, tmp_path / "off", **off))
