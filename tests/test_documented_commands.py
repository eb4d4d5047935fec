"""Every command the README, mlflow/README.md and k8s/README.md show, run as a new user would (issue 15).

Each documented command is accounted for (a new one without an entry here fails the first test): it is run
here as written, in a fresh HOME and working folder (`NewUser`), with only size overrides appended (a tiny
Llama, 2 meta-steps, 64 records) and placeholders filled (`runs/<run>`, RUN_A, a free port for 5000); or it
needs what this machine lacks (a GPU, a Kubernetes cluster) and its config is resolved with `--cfg job`; or
another test runs it (named, and checked to exist). The README's two quick-start commands are CI itself.
"""

import importlib
import json
import shlex
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from doc_commands import REPO_ROOT, NewUser, bash_commands, free_port, stop, wait_for_http, without_comment

from horse_dist.cli import run_cli

# one worker runs them: they share the user's folder, ports and MLflow store (each trains what it uses)
pytestmark = pytest.mark.xdist_group("documented")

DOCUMENTS = ("README.md", "mlflow/README.md", "k8s/README.md")
HEAD_FILE = REPO_ROOT / "data/zsre/zsre_mend_eval_head.json"
EXPERIMENT = "zsre-smollm2-135m"

RUN = "run here as written"
CONFIG = "config resolved here (--cfg job)"
CI = "CI runs it (.ci/run runs the quick start's test command on a fresh clone)"
NO_CLUSTER = (
    "needs Kubernetes, docker or a registry; tests/test_k8s.py checks what it applies, builds and uses"
)

# documented command (its trailing remark dropped) -> how it is checked
HOW: dict[str, str] = {
    "bash launch/setup_env.sh && .venv/bin/python -m horse_dist.train": CI + " (setup); the train run: "
    "test_the_using_it_block_runs_as_written runs the same entry point on the default config",
    "bash launch/setup_env.sh dev && .venv/bin/ruff check . && .venv/bin/ruff format --check . && "
    ".venv/bin/python -m pytest": CI,
    "python -m horse_dist.train method=malmen data.n_edits=64 train.steps=20": RUN,
    "python -m horse_dist.train method=horse_reference train.run_name=ref1": RUN,
    "python -m horse_dist.train train.run_name=ref1 train.resume=true train.steps=40": RUN,
    "python -m horse_dist.evaluate checkpoint=runs/ref1 data.n_edits=128": RUN,
    "python -m horse_dist.edit checkpoint=runs/ref1 edits=my_edits.json out=edited_model": RUN,
    "python -m horse_dist.train dist.backend=ray dist.num_workers=2 dist.zero_stage=0": RUN,
    "launch/start_head.sh && launch/submit.sh dist.num_workers=2 train.steps=20": "test_distributed.py::"
    "test_ray_job_submit (start_head.sh, submit.sh, logs.sh, stop.sh in a fresh HOME)",
    "python -m horse_dist.keystats --config configs/keystats_smollm2.yaml keystats.num_workers=2": RUN,
    "python -m horse_dist.sequential --config configs/sequential.yaml sequential.method=horse "
    "sequential.checkpoint=runs/<run>": RUN,
    "python -m horse_dist.sequential --config configs/sequential_batch.yaml sequential.method=mose": CONFIG
    + "; located edits take 15-24 s each on SmolLM2 here: test_sequential.py::test_locate_stream_on_the_tiny_model runs MOSE and MEMIT",
    "python -m horse_dist.sequential --config configs/sequential_mose.yaml sequential.steps=96": CONFIG
    + "; test_sequential.py::test_locate_stream_on_the_tiny_model runs MOSE",
    "python -m horse_dist.sequential --config configs/sequential_alphaedit.yaml sequential.steps=24": CONFIG
    + "; test_sequential.py::test_locate_stream_on_the_tiny_model runs AlphaEdit",
    "python -m horse_dist.sequential --config configs/sequential_memit.yaml sequential.steps=24": CONFIG
    + "; test_sequential.py::test_locate_stream_on_the_tiny_model runs MEMIT",
    "python -m horse_dist.sequential compare runs/<seq a> runs/<seq b> out=compare.png": RUN,
    "python -m horse_dist.bench": RUN,
    "python -m horse_dist.bench --config configs/bench_llama2_7b_gpu.yaml": CONFIG + "; needs a CUDA device",
    "mlflow/start_server.sh 5000 ./mlflow_server": RUN + " (a free port for 5000)",
    "python -m horse_dist.train tracking.uri=http://127.0.0.1:5000 method=malmen": RUN,
    "python -m horse_dist.evaluate checkpoint=runs/<run> sweep=16,32,64": RUN,
    "python -m horse_dist.sweep methods=horse,malmen,horse_reference": RUN,
    "python -m horse_dist.compare -e zsre-smollm2-135m --plot compare.png": RUN,
    "mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000": RUN + " (a free port for 5000)",
    "mlflow/start_server.sh": "the same script as `mlflow/start_server.sh 5000 ./mlflow_server` with its "
    "defaults; port 5000 itself may be taken on a test machine",
    "mlflow/start_server.sh 5001 /data/mlflow": RUN
    + " (a free port for 5001, a temporary folder for /data/mlflow)",
    "curl -s http://127.0.0.1:5000/health": RUN,
    "mlflow/compare.sh -e zsre-smollm2-135m": RUN,
    "mlflow/compare.sh -r RUN_A -r RUN_B --plot cmp.png": RUN,
    "mlflow/compare.sh --uri http://127.0.0.1:5000 -e zsre-smollm2-135m -f \"tags.method = 'malmen'\" --all-params": RUN,
}
CLUSTER_TOOLS = ("kubectl ", "helm ", "docker ", "export REGISTRY=", "for image in ", "done", "sed -i ")


def documented() -> list[tuple[str, str]]:
    return [(doc, without_comment(line)) for doc in DOCUMENTS for line in bash_commands(REPO_ROOT / doc)]


def how(command: str) -> str | None:
    if command in HOW:
        return HOW[command]
    if command.startswith(CLUSTER_TOOLS):
        return NO_CLUSTER
    if command.startswith("ray job ") and "--address http://localhost:8265" in command:
        # the cluster's `ray job submit`: its train command's config is resolved here
        return CONFIG + "; " + NO_CLUSTER if " -- python -m horse_dist." in command else NO_CLUSTER
    return None


def test_every_documented_command_is_accounted_for():
    commands = documented()
    unknown = [f"{doc}: {command}" for doc, command in commands if how(command) is None]
    assert not unknown, "documented commands no test runs or explains:\n" + "\n".join(unknown)
    stale = set(HOW) - {command for _, command in commands}
    assert not stale, f"HOW lists commands no document shows any more: {sorted(stale)}"
    tests = {p.name: p.read_text() for p in (REPO_ROOT / "tests").glob("test_*.py")}
    for command, reason in HOW.items():
        for module, name in (ref.split("::") for ref in _test_refs(reason)):
            assert f"def {name.split(' ')[0]}(" in tests[module], (
                f"{command}: {module}::{name} does not exist"
            )


def _test_refs(reason: str) -> list[str]:
    return [word.strip("(),;") for word in reason.split() if ".py::" in word]


# ---- run as written ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    from tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("new_user")
    model = save_tiny_model(root / "tiny-llama", "llama", seed=0)
    data = root / "zsre64.json"
    data.write_text(json.dumps(json.loads(HEAD_FILE.read_text())[:64]))
    port, other_port = free_port(), free_port()
    user = NewUser(
        root,
        {
            "runs/<seq a>": "runs/seq-a",
            "runs/<seq b>": "runs/seq-b",
            "5000": str(port),
            "5001": str(other_port),
            "/data/mlflow": str(root / "other_mlflow"),
        },
    )
    user.port, user.other_port = port, other_port
    user.small = [  # the only additions to a documented command: its size
        f"model.source={model}",
        "model.n_edit_layers=2",
        "method.rank=16",
        "method.chunk_rows=16",
        "data.n_edits=8",
        "data.batch_size=4",
        f"data.train_path={data}",
        f"data.eval_path={data}",
        "train.eval_n_edits=8",
        "train.eval_batches=1",
        "train.steps=2",
        f"tracking.experiment={EXPERIMENT}",
    ]
    return user


@pytest.fixture(scope="module")
def horse_run(user) -> str:
    """`runs/<run>` in the docs: a HORSE editor this user trained with the quick start's command."""
    user.run("python -m horse_dist.train", [*user.small, "train.run_name=editor"])
    user.substitutions["runs/<run>"] = "runs/editor"
    return "editor"


def _results(user: NewUser, run_name: str) -> dict:
    return json.loads((user.cwd / "runs" / run_name / "results.json").read_text())


def test_the_using_it_block_runs_as_written(user):
    runs = user.cwd / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    user.run("python -m horse_dist.train method=malmen data.n_edits=64 train.steps=20", user.small)
    (malmen_run,) = [p.name for p in set(runs.iterdir()) - before]
    assert _results(user, malmen_run)["n_edits"] == 8

    user.run("python -m horse_dist.train method=horse_reference train.run_name=ref1", user.small)
    assert _results(user, "ref1")["n_edits"] == 8
    resumed = user.run(
        "python -m horse_dist.train train.run_name=ref1 train.resume=true train.steps=40",
        [*user.small, "train.steps=3"],
    )
    assert "horse_reference" in (user.cwd / "runs/ref1/config.yaml").read_text()
    assert "resum" in (resumed.stdout + resumed.stderr).lower()
    state = torch.load(user.cwd / "runs/ref1/checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3

    evaluated = user.run(
        "python -m horse_dist.evaluate checkpoint=runs/ref1 data.n_edits=128", ["data.n_edits=8"]
    )
    assert "unedited" in evaluated.stdout and "edited" in evaluated.stdout

    edits = [
        {"prompt": "The capital of Norway is", "answer": "Bergen"},
        {"prompt": "Water boils at", "answer": "50 C"},
    ]
    (user.cwd / "my_edits.json").write_text(json.dumps(edits))
    user.run("python -m horse_dist.edit checkpoint=runs/ref1 edits=my_edits.json out=edited_model")
    metadata = json.loads((user.cwd / "edited_model/edit_metadata.json").read_text())
    assert metadata["n_edits"] == 2 and (user.cwd / "edited_model/config.json").is_file()


def test_the_tracking_block_runs_as_written(user, horse_run):
    from mlflow.tracking import MlflowClient

    server = user.start("mlflow/start_server.sh 5000 ./mlflow_server")
    other = user.start("mlflow/start_server.sh 5001 /data/mlflow")
    try:
        wait_for_http(f"http://127.0.0.1:{user.port}/health", server)
        assert user.run("curl -s http://127.0.0.1:5000/health").stdout.strip() == "OK"
        user.run(
            "python -m horse_dist.train tracking.uri=http://127.0.0.1:5000 method=malmen",
            [*user.small, "train.run_name=tracked"],
        )
        (run,) = MlflowClient(f"http://127.0.0.1:{user.port}").search_runs(
            [MlflowClient(f"http://127.0.0.1:{user.port}").get_experiment_by_name(EXPERIMENT).experiment_id]
        )
        assert run.data.tags["method"] == "malmen" and "eval/edited/ES" in run.data.metrics
        served = user.run(
            "mlflow/compare.sh --uri http://127.0.0.1:5000 -e zsre-smollm2-135m -f \"tags.method = 'malmen'\" "
            "--all-params"
        )
        assert run.info.run_id[:8] in served.stdout
        wait_for_http(f"http://127.0.0.1:{user.other_port}/health", other)
        assert (Path(user.substitutions["/data/mlflow"]) / "mlflow.db").is_file()
    finally:
        stop(server)
        stop(other)

    sweep = user.run("python -m horse_dist.evaluate checkpoint=runs/<run> sweep=16,32,64")
    assert all(f"{n} edits per batch:" in sweep.stdout for n in (16, 32, 64))
    user.run("python -m horse_dist.sweep methods=horse,malmen,horse_reference", user.small)
    compared = user.run("python -m horse_dist.compare -e zsre-smollm2-135m --plot compare.png")
    assert (user.cwd / "compare.png").stat().st_size > 1000
    assert all(method in compared.stdout for method in ("horse", "malmen", "horse_reference"))
    assert "malmen" in user.run("mlflow/compare.sh -e zsre-smollm2-135m").stdout
    with sqlite3.connect(user.cwd / "mlflow.db") as db:
        run_a, run_b = (row[0] for row in db.execute("SELECT run_uuid FROM runs ORDER BY start_time LIMIT 2"))
    user.substitutions.update(RUN_A=run_a, RUN_B=run_b)
    user.run("mlflow/compare.sh -r RUN_A -r RUN_B --plot cmp.png")
    assert (user.cwd / "cmp.png").stat().st_size > 1000

    ui = user.start("mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000")
    try:
        wait_for_http(f"http://127.0.0.1:{user.port}/health", ui)
        listed = wait_for_http(
            f"http://127.0.0.1:{user.port}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}",
            ui,
        )
        assert json.loads(listed)["experiment"]["name"] == EXPERIMENT
    finally:
        stop(ui)


def test_the_sequential_block_runs_as_written(user, horse_run):
    command = (
        "python -m horse_dist.sequential --config configs/sequential.yaml sequential.method=horse "
        "sequential.checkpoint=runs/<run>"
    )
    data = [arg for arg in user.small if arg.startswith("data.")]
    stream = ["sequential.steps=3", "sequential.batch_size=2", "sequential.eval_every=2"]
    stream += [
        "sequential.retention_edits=3",
        "sequential.sample_edits=4",
        f"tracking.experiment={EXPERIMENT}",
    ]
    for name in ("seq-a", "seq-b"):
        user.run(command, [*data, *stream, f"sequential.run_name={name}"])
        assert json.loads((user.cwd / "runs" / name / "sequential.json").read_text())["steps"] == 3
    user.run("python -m horse_dist.sequential compare runs/<seq a> runs/<seq b> out=compare.png")
    assert (user.cwd / "compare.png").stat().st_size > 1000


@pytest.mark.xdist_group("ray")  # the worker that runs every Ray test, one at a time
def test_the_ray_commands_run_as_written(tmp_path):
    """A local Ray started by the command itself in a fresh HOME (no token anywhere), then a Ray job."""
    from tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny-llama", "llama", seed=0)
    user = NewUser(tmp_path)
    data = tmp_path / "zsre64.json"
    data.write_text(json.dumps(json.loads(HEAD_FILE.read_text())[:64]))
    small = [f"model.source={model}", "model.n_edit_layers=2", "method.rank=16", "data.n_edits=8"]
    small += ["data.batch_size=4", f"data.train_path={data}", f"data.eval_path={data}", "train.steps=2"]
    small += ["train.eval_n_edits=8", "train.eval_batches=1", "train.run_name=ray", "tracking.enabled=false"]
    user.run("python -m horse_dist.train dist.backend=ray dist.num_workers=2 dist.zero_stage=0", small)
    results = json.loads((user.cwd / "runs/ray/results.json").read_text())
    assert {key.rsplit("/", 1)[1] for key in results if key.startswith("median_time/cache/")} == {"w0", "w1"}

    keystats = [f"model.source={model}", "model.n_edit_layers=2", "keystats.max_tokens=1500"]
    user.run(
        "python -m horse_dist.keystats --config configs/keystats_smollm2.yaml keystats.num_workers=2",
        [*keystats, "keystats.shard_tokens=300", "keystats.batch_size=4"],
    )
    cached = list((tmp_path / "home/.cache/horse_dist/keystats").rglob("*"))
    assert any(path.is_file() for path in cached), "keystats wrote nothing under ~/.cache/horse_dist/keystats"


def test_the_default_bench_runs_as_written(user):
    bench = ["bench.steps=1", "bench.warmup_steps=0", "bench.edit_sizes=[4]", "bench.edit_repeats=1"]
    user.run("python -m horse_dist.bench", [*user.small, *bench, "bench.probe_sizes=[128]"])
    report = json.loads((user.cwd / "bench.json").read_text())
    assert len(report["meta_step"]["wall_seconds_all"]) == 1 and report["edits"][0]["n_facts"] == 4


@pytest.mark.parametrize(
    "command",
    sorted({command for _, command in documented() if how(command) and how(command).startswith(CONFIG)}),
)
def test_commands_that_cannot_run_here_resolve_their_config(user, command, monkeypatch, capsys):
    """A GPU or a cluster is missing here, but a renamed key, a lost config file or a bad preset is not.

    In this process (the config does not depend on HOME or the environment; a subprocess would add 5 s of
    imports per command), from the new user's working folder.
    """
    inner = command.split(" -- ", 1)[-1]  # `ray job submit ... -- python -m ...` runs its python command
    python, flag, module, *args = shlex.split(without_comment(inner))
    assert (python, flag) == ("python", "-m") and module.startswith("horse_dist.")
    monkeypatch.chdir(user.cwd)
    monkeypatch.setenv("HOME", user.env["HOME"])
    if inner != command:  # on the cluster, whose horse-dist-env ConfigMap sets the tracking server
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    run_cli(importlib.import_module(module).main, [*args, "--cfg", "job"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert {"model", "data", "method", "train"} <= set(shown)
    for arg in args:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            section, name = key.split(".", 1)
            assert str(shown[section][name]) == value, (
                f"{key}: the resolved config says {shown[section][name]!r}"
            )
