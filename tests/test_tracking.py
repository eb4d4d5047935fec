"""MLflow tracking of tiny runs: sqlite store, sweep nesting, unreachable and real servers, compare."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors import safe_open
from tiny_models import save_tiny_model

from horse_dist import compare, evaluate, process, train
from horse_dist.cli import run_cli
from horse_dist.config import ConfigError
from horse_dist.process import exit_on_sigterm
from horse_dist.tracking.mlflow_run import PARENT_TAG, MLflowTracker, git_commit, registered_model_name
from horse_dist.training.checkpoint import atomic_write, load_checkpoint
from horse_dist.training.loop import final_metric_names, step_metric_names

HEAD_FILE = Path(__file__).resolve().parent.parent / "data/zsre/zsre_mend_eval_head.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~50x faster on one thread than on oversubscribed cores (CI shares its CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    model = save_tiny_model(root / "llama", "llama", seed=0)
    data = root / "zsre32.json"
    data.write_text(json.dumps(json.loads(HEAD_FILE.read_text())[:32]))

    def overrides(out_dir: Path, uri: str, **extra) -> list[str]:
        base = {
            "model.source": str(model),
            "model.n_edit_layers": 2,
            "method.rank": 16,
            "method.chunk_rows": 16,
            "data.n_edits": 8,
            "data.batch_size": 4,
            "data.train_path": str(data),
            "data.eval_path": str(data),
            "train.eval_n_edits": 8,
            "train.eval_batches": 1,
            "train.steps": 2,
            "train.out_dir": str(out_dir),
            "tracking.enabled": True,
            "tracking.uri": uri,
            "tracking.system_metrics_interval_s": 0.5,
        }
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]

    return overrides


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` (mlflow/start_server.sh) on 127.0.0.1; it boots (~10-30 s) while other tests run."""
    port = _free_port()
    folder = tmp_path_factory.mktemp("server")
    script = Path(__file__).resolve().parent.parent / "mlflow" / "start_server.sh"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    process = subprocess.Popen(
        ["bash", str(script), str(port), str(folder)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield process, f"http://127.0.0.1:{port}", folder
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def two_runs(tiny, tmp_path_factory, server):
    """Two tracked tiny trainings into one sqlite store; their configs differ in method.rank and meta_lr."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    train.main(tiny(root / "runs", uri, **{"train.run_name": "a"}))
    train.main(tiny(root / "runs", uri, **{"train.run_name": "b", "method.rank": 8, "train.meta_lr": 0.003}))
    client = MlflowClient(uri)
    runs = {
        r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
    }
    return uri, root, runs


def test_a_local_run_logs_params_metrics_tags_artifacts_and_the_registered_model(two_runs, tiny):
    uri, root, runs = two_runs
    client = MlflowClient(uri)
    run = runs["a"]
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "zsre-llama"  # <dataset>-<model>
    assert experiment.artifact_location.startswith((root / "mlruns").as_uri())  # beside the db, not ./mlruns
    tags = run.data.tags
    assert tags["method"] == "horse" and tags["dataset"] == "zsre" and tags["n_edits"] == "8"
    assert tags["world_size"] == "1" and tags["zero_stage"] == "0" and tags["seed"] == "0"
    assert tags["model"].endswith("llama") and tags["git_commit"] == git_commit()
    assert run.data.params["method.rank"] == "16" and run.data.params["tracking.queue_size"] == "1000"
    assert {k.split(".")[0] for k in run.data.params} == {
        "model",
        "data",
        "method",
        "train",
        "dist",
        "tracking",
    }
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/gen_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "perf/edits_per_s")] == [1, 2]
    for key in (
        "eval/edited/ES",
        "eval/edited/GS",
        "eval/edited/LS",
        "eval/unedited/ES",
        "eval/edited/loc_agreement",
        "train/loc_loss",
        "train/gs",
        "train/grad_norm",
        "perf/step_s",
        "perf/peak_rss_gb",
        "perf/median_step_s",
    ):
        assert key in run.data.metrics, key
    namespaces = {k.split("/")[0] for k in run.data.metrics}
    assert namespaces == {"train", "eval", "perf", "system"}, namespaces  # one namespace per kind of number
    assert "tracking/dropped_batches" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "results.json", "hypernetwork", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/loss_curves.png"]
    name = registered_model_name(tags["model"], "horse")
    assert name == "horse_dist-llama-horse"
    versions = {v.run_id: v for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {runs["a"].info.run_id, runs["b"].info.run_id}
    version = versions[run.info.run_id]
    assert version.source == f"{run.info.artifact_uri}/hypernetwork"
    assert run.data.tags["registered_model"] == f"{name}/{version.version}"
    model = Path(client.download_artifacts(run.info.run_id, "hypernetwork", str(root / "dl")))
    # a model from code with weights only: no pickle, no optimizer state, the package inside, pinned needs
    assert not list(model.rglob("*.pkl")) and not list(model.rglob("checkpoint.pt"))
    assert (model / "mlflow_model_code.py").is_file() and (model / "code/horse_dist/train.py").is_file()
    assert json.loads((model / "input_example.json").read_text())["columns"] == ["prompt", "answer"]
    requirements = (model / "requirements.txt").read_text().split()
    assert all("==" in r for r in requirements) and not any(r.startswith("horse_dist") for r in requirements)
    checkpoint = load_checkpoint(root / "runs" / "a")
    (weights,) = model.rglob("hypernetwork.safetensors")
    with safe_open(str(weights), framework="pt") as handle:
        assert handle.metadata()["config"] == checkpoint["config"]
        assert set(handle.keys()) == set(checkpoint["hypernet"])
        assert all(torch.equal(handle.get_tensor(k), v) for k, v in checkpoint["hypernet"].items())
    assert weights.stat().st_size < 0.6 * (root / "runs" / "a" / "checkpoint.pt").stat().st_size


def test_the_registered_hypernetwork_is_a_pyfunc_model_that_edits(two_runs, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    uri, root, runs = two_runs
    name = registered_model_name(runs["a"].data.tags["model"], "horse")
    version = runs["a"].data.tags["registered_model"].split("/")[-1]
    # Through the environment (undone after the test), not mlflow.set_*_uri: those stick for the process.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    records = json.loads(HEAD_FILE.read_text())[:4]
    facts = pd.DataFrame({"prompt": [r["src"] for r in records], "answer": [r["alt"] for r in records]})
    table = model.predict(facts)
    assert list(table.columns) == ["prompt", "answer", "unedited", "edited"]
    assert len(table) == 4 and table["edited"].between(0, 1).all()
    assert table["edited"].mean() > table["unedited"].mean()  # the batch edit took
    with pytest.raises(Exception, match="answer"):
        model.predict(pd.DataFrame({"prompt": ["x"]}))


def test_a_sweep_is_a_parent_run_with_a_nested_run_per_number_of_edits(two_runs, tmp_path):
    uri, root, runs = two_runs
    flat = evaluate.main(
        [
            f"checkpoint={root / 'runs' / 'a'}",
            "sweep=4,8",
            f"tracking.uri={uri}",
            "tracking.system_metrics=false",
        ]
    )
    assert set(flat) >= {"n_edits=4/edited/ES", "n_edits=8/edited/ES"}
    client = MlflowClient(uri)
    experiment = runs["a"].info.experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.sweep = 'n_edits'")
    children = client.search_runs([experiment], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["n_edits"] for c in children) == ["4", "8"]
    assert all(c.info.status == "FINISHED" and "eval/edited/ES" in c.data.metrics for c in children)
    assert {c.data.params["data.n_edits"] for c in children} == {"4", "8"}
    history = client.get_metric_history(parent.info.run_id, "eval/edited/ES")
    assert sorted(m.step for m in history) == [4, 8]
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == [
        "plots/metrics_vs_edits.png"
    ]


def test_a_methods_sweep_nests_one_training_run_per_method(tiny, tmp_path, capsys):
    from horse_dist import sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny(tmp_path / "runs", uri, **{"train.steps": 1, "tracking.system_metrics": False})
    with pytest.raises(ConfigError, match="unknown method preset 'nope'"):
        sweep.main(["methods=horse,nope", *overrides])  # refused before any run starts
    assert not (tmp_path / "runs").exists()
    out = sweep.main(["methods=horse,malmen", *overrides])
    assert set(out["results"]) == {"horse", "malmen"}
    client = MlflowClient(uri)
    (experiment,) = client.search_experiments(filter_string="name = 'zsre-llama'")
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.tags["sweep"] == "methods" and parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    assert sorted(c.data.tags["method"] for c in children) == ["horse", "malmen"]
    assert {c.data.params["method.locality"] for c in children} == {"ce", "kl"}  # the presets differ
    for child in children:
        method = child.data.tags["method"]
        assert parent.data.metrics[f"{method}/ES"] == pytest.approx(child.data.metrics["eval/edited/ES"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_methods.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/methods.png", "plots/pareto.png"}  # live ES against unchanged continuations
    table = capsys.readouterr().out
    assert "horse " in table and "malmen " in table and "median_step_seconds" in table


def test_a_knob_sweep_runs_each_method_at_each_value(tiny, tmp_path, capsys):
    from horse_dist import sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny(tmp_path / "runs", uri, **{"train.steps": 0, "tracking.system_metrics": False})
    with pytest.raises(ConfigError, match="method.eta_nit"):
        sweep.main(["methods=horse", "knob=method.eta_nit:1,2", *overrides])  # before any run starts
    with pytest.raises(ConfigError, match="expected section.key:value1,value2"):
        sweep.main(["methods=horse", "knob=method.eta_init", *overrides])
    assert not (tmp_path / "runs").exists()
    out = sweep.main(["methods=horse", "knob=method.eta_init:0.001,0.1", *overrides])
    assert list(out["results"]) == ["horse eta_init 0.001", "horse eta_init 0.1"]
    client = MlflowClient(uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.params["sweep.knob"] == "method.eta_init:0.001,0.1"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    assert sorted(c.data.params["method.eta_init"] for c in children) == ["0.001", "0.1"]
    small, large = (out["results"][f"horse eta_init {v}"] for v in ("0.001", "0.1"))
    assert small["edited/ES"] != large["edited/ES"]  # the knob reached the editor
    assert parent.data.metrics["horse eta_init 0.1/ES"] == pytest.approx(large["edited/ES"])
    assert "horse eta_init 0.001  " in capsys.readouterr().out


def test_compare_prints_config_differences_and_final_metrics(two_runs, tmp_path, capsys):
    uri, _, runs = two_runs
    a, b = runs["a"], runs["b"]
    plot = tmp_path / "cmp.png"
    table = compare.main(["--uri", uri, "--run", a.info.run_id, "--run", b.info.run_id, "--plot", str(plot)])
    assert table in capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.strip()}
    assert lines["run"] == ["a", "b"]
    assert lines["method.rank"] == ["16", "8"]
    assert lines["train.meta_lr"][1] == "0.003"
    assert "data.n_edits" not in lines and "train.steps" not in lines  # the same in both runs
    for run, column in ((a, 0), (b, 1)):
        assert lines["eval/edited/ES"][column] == f"{run.data.metrics['eval/edited/ES']:.4g}"
        assert lines["train/gen_loss"][column] == f"{run.data.metrics['train/gen_loss']:.4g}"
    assert plot.stat().st_size > 1000
    by_experiment = compare.main(
        ["--uri", uri, "-e", "zsre-llama", "-f", "tags.method = 'horse'", "--plot", ""]
    )
    assert "method.rank" in by_experiment

    pareto = tmp_path / "pareto.png"
    compare.main(
        [
            "--uri",
            uri,
            "-e",
            "zsre-llama",
            "--plot",
            "",
            "--pareto",
            "ES:loc_agreement",
            "--pareto-plot",
            str(pareto),
        ]
    )
    assert pareto.stat().st_size > 1000
    with pytest.raises(SystemExit, match="no run has eval/<row>/ES and eval/<row>/nope"):
        compare.main(["--uri", uri, "-e", "zsre-llama", "--plot", "", "--pareto", "ES:nope"])


def test_pareto_frontier_by_hand():
    points = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.2), (0.9, 0.1), (0.5, 0.5)]
    assert compare.pareto_frontier(points) == [(0.1, 0.9), (0.5, 0.5), (0.9, 0.2)]
    assert compare.pareto_frontier([(0.3, 0.3)]) == [(0.3, 0.3)]


def test_pareto_figure_gives_each_of_twelve_labels_its_own_colour():
    import matplotlib.pyplot as plt

    points = {f"m{i}": {"untrained": (i / 12, 0.5), "edited": (i / 12, 0.6)} for i in range(12)}
    figure = compare.pareto_figure(points, "live_ES", "loc_gen_same")
    colours = [tuple(c.get_facecolor()[0]) for c in figure.axes[0].collections]
    assert len(colours) == 24 and len(set(colours)) == 12
    assert colours[0] == colours[1]  # one label's states share its colour
    plt.close(figure)


def test_training_survives_an_unreachable_tracking_server(tiny, tmp_path):
    started = time.perf_counter()
    result = train.main(tiny(tmp_path, f"http://127.0.0.1:{_free_port()}", **{"train.run_name": "offline"}))
    assert time.perf_counter() - started < 45
    assert "edited/ES" in result and (tmp_path / "offline" / "results.json").exists()


def test_a_slow_store_drops_metric_batches_instead_of_blocking(tmp_path, monkeypatch):
    """Metrics go through MLflow's asynchronous logging; past `queue_size` batches in flight they are
    dropped and counted, so a store that takes 0.3 s per batch delays neither the steps nor the run's end."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{tmp_path / 'slow.db'}"
    real = SqlAlchemyStore.log_batch
    batches = []

    def slow_log_batch(store, run_id, metrics, params, tags):
        if metrics:
            time.sleep(0.3)
            batches.append([m.value for m in metrics])
        return real(store, run_id, metrics, params, tags)

    # before the tracker opens the store: MLflow's async queue binds the store's log_batch when it is made
    monkeypatch.setattr(SqlAlchemyStore, "log_batch", slow_log_batch)
    tracker = MLflowTracker(uri, "slow", "slow", {}, queue_size=2, flush_timeout_s=0.5)
    started = time.perf_counter()
    for step in range(20):
        tracker.log_metrics({"loss": float(step)}, step)
    assert time.perf_counter() - started < 0.2  # never waits for the store
    tracker.finish()
    assert time.perf_counter() - started < 3
    # the first two were in flight at once (a slow VM may free a slot for one more before the loop ends)
    assert tracker.dropped >= 15 and tracker.dropped + len(batches) == 20
    logged = [m.value for m in MlflowClient(uri).get_metric_history(tracker.run_id, "loss")]
    assert sorted(logged) == sorted(v for batch in batches for v in batch) and sorted(logged)[:2] == [
        0.0,
        1.0,
    ]
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["tracking/dropped_batches"] == tracker.dropped


def test_a_failing_asynchronous_batch_turns_tracking_off_once(tmp_path, monkeypatch, caplog):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    real = SqlAlchemyStore.log_batch
    calls = []

    def failing_log_batch(store, run_id, metrics, params, tags):
        if metrics:
            calls.append(len(metrics))
            raise RuntimeError("disk full")
        return real(store, run_id, metrics, params, tags)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", failing_log_batch)
    uri = f"sqlite:///{tmp_path / 'failing.db'}"
    tracker = MLflowTracker(uri, "failing", "failing", {})
    tracker.log_metrics({"loss": 1.0}, 0)
    deadline = time.time() + 10
    while not tracker._broken and time.time() < deadline:
        time.sleep(0.05)
    tracker.log_metrics({"loss": 2.0}, 1)  # not sent: tracking is off
    tracker.finish()
    assert calls == [1]
    warnings = [r.getMessage() for r in caplog.records if r.name == "horse_dist.tracking.mlflow_run"]
    assert len(warnings) == 1 and "log_metrics failed" in warnings[0] and "disk full" in warnings[0]
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_system_metrics_are_sampled_into_the_run(two_runs):
    uri = two_runs[0]
    tracker = MLflowTracker(uri, "system", "system", {}, system_metrics=True, system_metrics_interval_s=0.2)
    client, deadline = MlflowClient(uri), time.time() + 20
    while not any(k.startswith("system/") for k in client.get_run(tracker.run_id).data.metrics):
        assert time.time() < deadline, "no system metrics logged"
        time.sleep(0.2)
    tracker.finish()
    metrics = client.get_run(tracker.run_id).data.metrics
    assert (
        "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    )


def test_a_meta_steps_metrics_go_to_train_and_perf_with_their_units():
    metrics = {"gen_loss": 1.5, "train_gs": 0.7, "grad_norm": 0.3, "eta/m.24": 3.0, "step_seconds": 6.0}
    metrics |= {"time/cache": 2.0, "time/cache/w1": 2.1, "step_seconds/w1": 6.1, "edits_per_s": 10.0}
    metrics |= {"comm_bytes/all_reduce": 8.0, "block_cache/hit_rate": 0.5}
    assert step_metric_names(metrics) == {
        "train/gen_loss": 1.5,
        "train/gs": 0.7,
        "train/grad_norm": 0.3,
        "train/eta/m.24": 3.0,
        "perf/step_s": 6.0,
        "perf/cache_s": 2.0,
        "perf/cache_s/w1": 2.1,
        "perf/step_s/w1": 6.1,
        "perf/edits_per_s": 10.0,
        "perf/comm_bytes/all_reduce": 8.0,
        "perf/block_cache/hit_rate": 0.5,
    }


def test_a_runs_final_result_goes_to_eval_and_its_time_and_memory_to_perf():
    result = {"edited/ES": 0.9, "n_edits": 64.0, "median_step_seconds": 6.5, "median_time/cache": 1.5}
    result |= {"median_time/cache/w1": 1.6, "peak_rss_gb": 2.3, "peak_rss_gb/w1": 2.2}
    assert final_metric_names(result) == {
        "eval/edited/ES": 0.9,
        "eval/n_edits": 64.0,
        "perf/median_step_s": 6.5,
        "perf/median_cache_s": 1.5,
        "perf/median_cache_s/w1": 1.6,
        "perf/peak_rss_gb": 2.3,
        "perf/peak_rss_gb/w1": 2.2,
    }


def test_runs_start_as_mlflow_start_run_does_and_nest_only_under_their_parent(two_runs):
    """Standard tags (source, user) come from mlflow.start_run; a child nests under its parent, and a second
    job's run in the same thread while another is active is no child of it."""
    uri = two_runs[0]
    client = MlflowClient(uri)
    parent = MLflowTracker(uri, "nesting", "parent", {"method": "horse"})
    child = MLflowTracker(uri, "nesting", "child", {}, parent_run_id=parent.run_id)
    assert mlflow.active_run().info.run_id == child.run_id  # nested on this thread's stack
    child.finish()
    beside = MLflowTracker(uri, "nesting", "beside", {})  # the parent is still active: created beside it
    beside.finish("FAILED")
    parent.finish()
    assert mlflow.active_run() is None
    runs = {r.info.run_name: r for r in client.search_runs([parent.experiment_id])}
    assert {n: r.info.status for n, r in runs.items()} == {
        "parent": "FINISHED",
        "child": "FINISHED",
        "beside": "FAILED",
    }
    for run in runs.values():
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
        assert run.data.tags["git_commit"] == git_commit()
    assert runs["child"].data.tags[PARENT_TAG] == parent.run_id
    assert PARENT_TAG not in runs["beside"].data.tags and PARENT_TAG not in runs["parent"].data.tags
    assert runs["parent"].data.tags["method"] == "horse"


def test_a_real_mlflow_server_receives_a_run_over_http(tiny, server, tmp_path):
    process, uri, folder = server
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        assert process.poll() is None and time.time() < deadline, "mlflow server did not start"
        time.sleep(0.5)
    train.main(
        tiny(
            tmp_path / "runs",
            uri,
            **{"train.run_name": "served", "train.steps": 1, "tracking.system_metrics": False},
        )
    )
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("zsre-llama").experiment_id])
    assert run.info.run_name == "served" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/gen_loss")] == [1]
    assert "eval/edited/ES" in run.data.metrics and run.data.params["data.n_edits"] == "8"
    assert {"config.yaml", "results.json", "hypernetwork"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    assert list(
        (folder / "artifacts").rglob("hypernetwork.safetensors")
    )  # proxied to the server's artifact root
    (version,) = client.search_model_versions("name = 'horse_dist-llama-horse'")
    assert version.run_id == run.info.run_id


def test_a_sigterm_during_a_checkpoint_write_exits_right_after_it(tmp_path, monkeypatch):
    """Raised inside torch.save's zip writer, the exit used to turn into the writer's own error (status 1)."""
    monkeypatch.setattr(process, "_received", [])  # this test's signals stay out of later run_cli calls
    path = tmp_path / "checkpoint.pt"

    def write_and_get_killed(handle):
        handle.write(b"first half, ")
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs now, in this thread, and only takes note
        handle.write(b"second half")

    previous = signal.getsignal(signal.SIGTERM)
    exit_on_sigterm()
    try:
        with pytest.raises(SystemExit) as deferred:
            atomic_write(path, write_and_get_killed)
        with pytest.raises(SystemExit) as immediate:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # not reached
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert deferred.value.code == immediate.value.code == 128 + signal.SIGTERM
    assert path.read_bytes() == b"first half, second half"  # written whole and renamed into place
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_sigterm_that_a_library_turns_into_its_own_error_still_exits_as_killed(monkeypatch, capsys):
    """OmegaConf's `finally` once raised UnboundLocalError while the SystemExit(143) passed through it: the
    job exited 1 with a traceback, and a pod's restart policy read a crash instead of a stop."""
    monkeypatch.setattr(process, "_received", [])

    def main(_args):
        exit_on_sigterm()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # not reached: the handler raises SystemExit here
        finally:
            raise UnboundLocalError("cannot access local variable 'old'")

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stopped:
            run_cli(main, [])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "stopped by signal 15 (UnboundLocalError on the way out)\n"


def test_sigterm_closes_the_run_as_failed_and_keeps_the_checkpoint(tiny, tmp_path):
    """Pod deletion or `ray job stop` sends SIGTERM: the run must not stay RUNNING, the checkpoint stays good."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny(
        tmp_path / "runs",
        uri,
        **{
            "train.steps": 500,
            "train.checkpoint_every": 1,
            "train.run_name": "killed",
            "tracking.system_metrics": False,
        },
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "horse_dist.train", *overrides], env=env, cwd=tmp_path)
    checkpoint = tmp_path / "runs" / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists():
        assert process.poll() is None and time.time() < deadline, "training did not write a checkpoint"
        time.sleep(0.2)
    process.send_signal(15)
    assert process.wait(timeout=60) == 128 + 15
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("zsre-llama").experiment_id])
    assert run.info.status == "FAILED"
    assert torch.load(checkpoint, weights_only=False)["step"] >= 1
