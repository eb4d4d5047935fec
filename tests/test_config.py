import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from horse_dist.config import (
    CONFIG_DIR,
    JOB_SECTIONS,
    ConfigError,
    config_from_yaml,
    flatten,
    load_config,
    load_config_with_extras,
    split_cli,
    to_yaml,
    with_changes,
)


def test_default_config_is_smollm2_zsre_horse_local():
    cfg = load_config()
    assert cfg.model.source == "smollm2-135m"
    assert cfg.data.name == "zsre" and cfg.data.train_path.endswith("zsre_mend_eval_head.json")
    assert cfg.method.name == "horse" and cfg.method.spread == "orthogonal" and cfg.method.locality == "ce"
    assert cfg.dist.backend == "local"


@pytest.mark.parametrize(
    "preset, spread, locality, learn_lambda",
    [
        ("horse", "orthogonal", "ce", True),
        ("horse_reference", "reference", "ce", False),
        ("malmen", "none", "kl", True),
        ("agrade", "orthogonal", "kl", True),
    ],
)
def test_method_presets(preset, spread, locality, learn_lambda):
    cfg = load_config(overrides=[f"method={preset}"])
    assert (cfg.method.name, cfg.method.spread, cfg.method.locality, cfg.method.learn_lambda) == (
        preset,
        spread,
        locality,
        learn_lambda,
    )


def test_every_yaml_under_configs_loads():
    for group in ("model", "data", "method"):
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            cfg = load_config(overrides=[f"{group}={path.stem}"])
            assert getattr(cfg, group) is not None


def test_overrides_are_typed():
    cfg = load_config(overrides=["data.n_edits=16", "method.rank=8", "train.meta_lr=3e-4"])
    assert cfg.data.n_edits == 16 and cfg.method.rank == 8 and cfg.train.meta_lr == pytest.approx(3e-4)


def test_unknown_key_is_a_clear_error():
    with pytest.raises(ConfigError, match="n_edit"):
        load_config(overrides=["data.n_edit=16"])


def test_wrong_type_is_a_clear_error():
    with pytest.raises(ConfigError, match="n_edits"):
        load_config(overrides=["data.n_edits=many"])


def test_bad_choice_and_nonpositive_values():
    with pytest.raises(ConfigError, match=r"method.spread='diagonal' is not one of"):
        load_config(overrides=["method.spread=diagonal"])
    with pytest.raises(ConfigError, match="data.n_edits must be positive"):
        load_config(overrides=["data.n_edits=0"])
    with pytest.raises(
        ConfigError, match=r"data.pack_row_tokens must be >= 0 \(0: chosen per plan\), got -1"
    ):
        load_config(overrides=["data.pack_row_tokens=-1"])


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match=r"unknown method preset 'memit'.*horse"):
        load_config(overrides=["method=memit"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nowhere.yaml")


def test_run_file_and_cli(tmp_path: Path):
    run = tmp_path / "run.yaml"
    run.write_text("defaults:\n  method: malmen\ntrain:\n  steps: 3\n")
    cli = split_cli(["--config", str(run), "train.seed=5"])
    cfg = load_config(cli.config_file, cli.overrides)
    assert not cli.show_config and split_cli(["--cfg", "job", "a=1"]).show_config
    with pytest.raises(ConfigError, match="--cfg takes one value: job"):
        split_cli(["--cfg", "hydra"])
    assert cfg.method.name == "malmen" and cfg.train.steps == 3 and cfg.train.seed == 5
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["steps"])


def test_saved_yaml_round_trips_and_locks_model_and_method():
    cfg = load_config(overrides=["method=malmen", "data.n_edits=8"])
    again = config_from_yaml(to_yaml(cfg), ["data.n_edits=32"])
    assert flatten(again) == {**flatten(cfg), "data.n_edits": 32}
    with pytest.raises(ConfigError, match="fixed by the checkpoint"):
        config_from_yaml(to_yaml(cfg), ["method=horse"])


def test_extras_are_split_off():
    cfg, extras = load_config_with_extras(
        None, ["checkpoint=runs/x", "data.n_edits=8"], ("checkpoint", "out")
    )
    assert extras == {"checkpoint": "runs/x"} and cfg.data.n_edits == 8


@pytest.mark.parametrize("command", ["train", "bench_ab", "sequential", "keystats"])  # all share split_cli
def test_help_lists_groups_presets_and_the_jobs_keys_and_exits_0(command):
    done = subprocess.run(
        [sys.executable, "-m", f"horse_dist.{command}", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"usage: python -m horse_dist.{command}" in done.stdout and "--cfg job" in done.stdout
    sections = {
        line.strip().split(".")[0] for line in done.stdout.splitlines() if re.match(r"  \w+\.\w+=", line)
    }
    assert sections == set(JOB_SECTIONS[command])  # only the keys this job reads
    assert ("  method: agrade, horse, horse_reference, malmen" in done.stdout) == ("method" in sections)
    assert ("  data.target='new'  [new | true]" in done.stdout) == ("data" in sections)


def test_cfg_job_prints_the_resolved_config_and_runs_nothing(tmp_path):
    args = ["method=malmen", "train.steps=7", f"train.out_dir={tmp_path}", "--cfg", "job"]
    done = subprocess.run(
        [sys.executable, "-m", "horse_dist.train", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed == yaml.safe_load(to_yaml(load_config(None, args[:3]), "train"))
    assert set(printed) == set(JOB_SECTIONS["train"])  # the sections a training run reads, not bench's
    assert printed["method"]["name"] == "malmen" and printed["train"]["steps"] == 7
    assert list(tmp_path.iterdir()) == []  # no run folder, no mlflow.db


def test_a_loaded_config_is_frozen_and_changes_make_a_copy():
    cfg = load_config(None, ["train.steps=3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 4  # type: ignore[misc]
    named = with_changes(cfg, {"train.run_name": "mine", "model.device": "cpu"})
    assert (named.train.run_name, named.model.device, named.train.steps) == ("mine", "cpu", 3)
    assert (cfg.train.run_name, cfg.model.device) == ("", "auto")  # the original is untouched
    with pytest.raises(ConfigError, match="unknown config key 'train.stpes'; did you mean train.steps"):
        with_changes(cfg, {"train.stpes": 4})
