"""The Kubernetes deployment files in k8s/, checked offline.

Every YAML document parses; every kustomization is rendered by k8s/kustomize_lite.py (resources, ConfigMap
generators, namespace, name prefix/suffix with declared name references, JSON6902 patches, images: the
subset of kustomize the files use; anything else is refused) and every resulting manifest validates against the Kubernetes schemas bundled with `kubernetes-validate` (strict) or,
for RayJob/RayCluster, against k8s/schemas/kuberay/ray.io_v1.schema.json. The manifests may only name
images built by the README's `docker build` commands (or pinned third-party ones), run configs that exist and
resolve with `load_config` under the pods' environment, and secrets the README creates. GPU pods need
requests == limits, the nvidia.com/gpu toleration and a memory-backed /dev/shm. The negative tests show that
each check catches the mistake it is there for.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from doc_commands import bash_commands
from referencing import Registry, Resource

from horse_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
# the renderer is a tool of k8s/ (python k8s/kustomize_lite.py DIR), not a package module: load it by path
_spec = importlib.util.spec_from_file_location("kustomize_lite", REPO / "k8s" / "kustomize_lite.py")
kustomize_lite = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kustomize_lite  # registered first: its dataclasses look themselves up there
_spec.loader.exec_module(kustomize_lite)
KustomizeError, load_docs, render = (
    kustomize_lite.KustomizeError,
    kustomize_lite.load_docs,
    kustomize_lite.render,
)
split_image, join_image, iter_containers = (
    kustomize_lite.split_image,
    kustomize_lite.join_image,
    kustomize_lite.iter_containers,
)

K8S = REPO / "k8s"
README = K8S / "README.md"
KUBERAY_SCHEMA = K8S / "schemas" / "kuberay" / "ray.io_v1.schema.json"
K8S_VERSION = "1.30"
K8S_DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"
NAMESPACE = "horse-dist"
PLATFORM = "platform"
WORKLOADS = ("base", "overlays/llama2-7b-8gpu", "overlays/llama2-13b-8gpu-offload", "raycluster")
KUSTOMIZATIONS = (PLATFORM, *WORKLOADS)
GPU = "nvidia.com/gpu"
RAY_KINDS = ("RayJob", "RayCluster")

Doc = dict[str, Any]


@cache
def _rendered(name: str) -> tuple[str, ...]:
    return tuple(json.dumps(doc) for doc in render(K8S / name))


def rendered(name: str) -> list[Doc]:
    """A fresh copy of the rendering of k8s/<name> (tests may mutate it)."""
    return [json.loads(text) for text in _rendered(name)]


# --------------------------------------------------------------------------------------------------------
# Schema validation


@cache
def _kuberay_validators() -> dict[str, jsonschema.Draft202012Validator]:
    definitions = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{K8S_VERSION}.0-local-strict"
        / "_definitions.json"
    )
    kuberay = json.loads(KUBERAY_SCHEMA.read_text())
    registry = Registry().with_resources(
        [
            (K8S_DEFINITIONS_URI, Resource.from_contents(json.loads(definitions.read_text()))),
            (kuberay["$id"], Resource.from_contents(kuberay)),
        ]
    )
    return {
        kind: jsonschema.Draft202012Validator({"$ref": f"{kuberay['$id']}#/$defs/{kind}"}, registry=registry)
        for kind in RAY_KINDS
    }


def schema_errors(doc: Doc) -> list[str]:
    """Why `doc` is not a valid manifest (empty: valid)."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion") == "ray.io/v1":
        validator = _kuberay_validators().get(doc.get("kind", ""))
        if validator is None:
            return [f"{where}: no KubeRay schema for kind {doc.get('kind')!r}"]
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        ]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{where}: {'.'.join(map(str, err.path))}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"{where}: {err.message}"]
    return []


# --------------------------------------------------------------------------------------------------------
# Pod templates, environment, references


def pod_templates(doc: Doc) -> Iterator[tuple[str, str, Doc]]:
    """(label, role, pod spec) of every pod template in a manifest; role: ray-head | ray-worker | other."""
    spec = doc.get("spec", {})
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield f"{kind}/{doc['metadata']['name']}", "other", spec["template"]["spec"]
        return
    if kind not in RAY_KINDS:
        return
    cluster = spec.get("rayClusterSpec", {}) if kind == "RayJob" else spec
    name = f"{kind}/{doc['metadata']['name']}"
    if "headGroupSpec" in cluster:
        yield f"{name} head", "ray-head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"{name} worker group {group['groupName']}", "ray-worker", group["template"]["spec"]
    if "submitterPodTemplate" in spec:
        yield f"{name} submitter", "other", spec["submitterPodTemplate"]["spec"]


def gpu_count(container: Doc, section: str) -> int | None:
    value = container.get("resources", {}).get(section, {}).get(GPU)
    return None if value is None else int(str(value))


def gpu_policy_problems(doc: Doc) -> list[str]:
    problems = []
    for label, role, pod in pod_templates(doc):
        pod_gpus = 0
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            requests, limits = gpu_count(container, "requests"), gpu_count(container, "limits")
            if (requests, limits) != (None, None) and requests != limits:
                problems.append(f"{label} {container['name']}: {GPU} requests {requests} != limits {limits}")
            pod_gpus += limits or requests or 0
        tolerated = any(
            t.get("key") == GPU and t.get("effect", "") in ("", "NoSchedule")
            for t in pod.get("tolerations", [])
        )
        if pod_gpus and not tolerated:
            problems.append(f"{label}: requests GPUs but has no toleration for {GPU}")
        if role.startswith("ray-"):
            memory_volumes = {
                v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"
            }
            ray_container = pod["containers"][0]
            shm = [m for m in ray_container.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
            if not shm or shm[0]["name"] not in memory_volumes:
                problems.append(f"{label}: /dev/shm is not an emptyDir with medium Memory")
    if doc["kind"] in RAY_KINDS:
        cluster = doc["spec"].get("rayClusterSpec", {}) if doc["kind"] == "RayJob" else doc["spec"]
        head = cluster["headGroupSpec"]
        head_gpus = gpu_count(head["template"]["spec"]["containers"][0], "limits")
        if not head_gpus and head.get("rayStartParams", {}).get("num-gpus") != "0":
            # kuberay#2098: a head without a GPU request can still see the host's GPUs
            problems.append(
                f"{doc['kind']}/{doc['metadata']['name']}: head requests no GPU but lacks num-gpus: '0'"
            )
    return problems


def readme_text() -> str:
    return README.read_text()


def readme_commands() -> list[str]:
    """Shell lines inside the README's ```bash blocks, with backslash continuations joined."""
    return bash_commands(README)


def readme_secrets() -> dict[str, set[str]]:
    """{secret name: keys} created by `kubectl -n <namespace> create secret generic` in the README."""
    secrets: dict[str, set[str]] = {}
    for line in readme_commands():
        tokens = shlex.split(line, comments=True)
        if tokens[:1] != ["kubectl"] or "secret" not in tokens or "generic" not in tokens:
            continue
        namespace_ok = (
            any((a in ("-n", "--namespace") and b == NAMESPACE) for a, b in zip(tokens, tokens[1:]))
            or f"--namespace={NAMESPACE}" in tokens
        )
        assert namespace_ok, f"README creates a secret outside namespace {NAMESPACE}: {line}"
        name = tokens[tokens.index("generic") + 1]
        keys = {t.split("=", 2)[1] for t in tokens if t.startswith(("--from-literal=", "--from-file="))}
        secrets.setdefault(name, set()).update(keys)
    return secrets


def platform_index() -> tuple[dict[str, dict[str, str]], set[str]]:
    """ConfigMaps (name -> data) and PersistentVolumeClaim names that k8s/platform creates."""
    docs = rendered(PLATFORM)
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    return config_maps, claims


def reference_problems(
    doc: Doc, config_maps: dict[str, dict[str, str]], claims: set[str], secrets: dict[str, set[str]]
) -> list[str]:
    problems = []
    claim_templates = {t["metadata"]["name"] for t in doc.get("spec", {}).get("volumeClaimTemplates", [])}
    for label, _, pod in pod_templates(doc):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is not None and claim not in claims:
                problems.append(f"{label}: PVC {claim!r} is not created by k8s/{PLATFORM}")
            config_map = volume.get("configMap", {}).get("name")
            if config_map is not None and config_map not in config_maps:
                problems.append(f"{label}: volume {volume['name']!r} names missing ConfigMap {config_map!r}")
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes and mount["name"] not in claim_templates:
                    problems.append(
                        f"{label} {container['name']}: mounts undeclared volume {mount['name']!r}"
                    )
            for source in container.get("envFrom", []):
                if "configMapRef" in source and source["configMapRef"]["name"] not in config_maps:
                    problems.append(f"{label}: ConfigMap {source['configMapRef']['name']!r} does not exist")
                if "secretRef" in source and source["secretRef"]["name"] not in secrets:
                    problems.append(
                        f"{label}: Secret {source['secretRef']['name']!r} is not created in README"
                    )
            for var in container.get("env", []):
                ref = var.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
                    if key not in secrets.get(name, set()):
                        problems.append(f"{label}: Secret {name!r} key {key!r} is not created by the README")
                if "configMapKeyRef" in ref:
                    name, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
                    if key not in config_maps.get(name, {}):
                        problems.append(f"{label}: ConfigMap {name!r} has no key {key!r}")
    return problems


def container_env(container: Doc, config_maps: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment Kubernetes gives `container` (secrets replaced by dummy values)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):  # (secretRef: keys unknown here; no manifest uses it)
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        ref = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in ref:
            env[var["name"]] = f"dummy-{ref['secretKeyRef']['name']}-{ref['secretKeyRef']['key']}"
        elif "configMapKeyRef" in ref:
            env[var["name"]] = config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
    return env


def expand_env(text: str, env: dict[str, str]) -> str:
    """$VAR, ${VAR} and $(VAR) -> value from env, or a dummy."""

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return env.get(name, f"dummy-{name}")

    return re.sub(r"\$\((\w+)\)|\$\{(\w+)\}|\$(\w+)", value, text)


# --------------------------------------------------------------------------------------------------------
# Dockerfiles, images


def dockerfile_builds() -> dict[str, Path]:
    """{image tag: Dockerfile} from the README's `docker build -f FILE -t IMAGE CONTEXT` commands."""
    builds = {}
    for line in readme_commands():
        tokens = shlex.split(line)
        if tokens[:2] != ["docker", "build"]:
            continue
        dockerfile = REPO / tokens[tokens.index("-f") + 1]
        image = tokens[tokens.index("-t") + 1]
        assert dockerfile.is_file(), f"README builds {image} from missing {dockerfile}"
        assert (REPO / tokens[-1]).is_dir(), f"README's build context {tokens[-1]} does not exist"
        builds[image] = dockerfile
    return builds


def dockerfile_args(dockerfile: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)", dockerfile.read_text(), flags=re.M))


def dockerfile_label(dockerfile: Path, label: str) -> str | None:
    found = re.search(rf'{re.escape(label)}="([^"]*)"', dockerfile.read_text())
    return found.group(1) if found else None


def trainer_dockerfile() -> Path:
    return K8S / "docker" / "Dockerfile"


def dockerfile_workdir(dockerfile: Path) -> str:
    return re.findall(r"^WORKDIR (\S+)", dockerfile.read_text(), flags=re.M)[-1]


def in_trainer_image(path: str) -> bool:
    """Whether the trainer image holds repository file `path`: the Dockerfile copies a folder above it and
    its dockerignore (everything out, then `!` exceptions) lets the file through."""
    copied = re.findall(r"^COPY (?:--\S+ )*(\S+) ", trainer_dockerfile().read_text(), flags=re.M)
    if not any(path == source or path.startswith(source.rstrip("/") + "/") for source in copied):
        return False
    ignore = (K8S / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    return any(fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/") for pattern in allowed)


# --------------------------------------------------------------------------------------------------------
# Entrypoints

SAFE_ENTRYPOINT = re.compile(r"[A-Za-z0-9_./=:,+@%\- ]+")


def entrypoint_problems(entrypoint: str) -> list[str]:
    """An entrypoint that KubeRay can paste into the submitter's shell command unchanged."""
    if not SAFE_ENTRYPOINT.fullmatch(entrypoint):
        return [
            f"entrypoint has shell metacharacters (the submitter's shell would expand them): {entrypoint!r}"
        ]
    tokens = shlex.split(entrypoint)
    if tokens[:3] not in (["python", "-m", "horse_dist.train"], ["python3", "-m", "horse_dist.train"]):
        return [f"entrypoint is not `python -m horse_dist.train ...`: {entrypoint!r}"]
    return []


def split_entrypoint(entrypoint: str) -> tuple[str, str, list[str]]:
    """(module, config path, key=value overrides) of `python -m MODULE --config FILE k=v ...`."""
    tokens = shlex.split(entrypoint)
    module, args = tokens[2], tokens[3:]
    assert "--config" in args, f"entrypoint names no --config: {entrypoint!r}"
    position = args.index("--config")
    config = args[position + 1]
    overrides = args[:position] + args[position + 2 :]
    assert all("=" in o and not o.startswith("-") for o in overrides), f"unexpected arguments {overrides}"
    return module, config, overrides


def module_file(module: str) -> Path:
    return REPO / (module.replace(".", "/") + ".py")


def ray_cluster_spec(doc: Doc) -> Doc:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def mount_paths(pod: Doc, claim: str) -> set[str]:
    names = {
        v["name"]
        for v in pod.get("volumes", [])
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    }
    return {m["mountPath"] for m in pod["containers"][0].get("volumeMounts", []) if m["name"] in names}


def mounted_file(head: Doc, path: str, docs: list[Doc]) -> str:
    """The text of `path` in the head's container: a key of a ConfigMap volume from the same rendering."""
    folder, key = str(Path(path).parent), Path(path).name
    mounts = [m for m in head["containers"][0].get("volumeMounts", []) if m["mountPath"] == folder]
    assert mounts, f"{path}: no volume is mounted at {folder} on the head"
    volume = next(v for v in head.get("volumes", []) if v["name"] == mounts[0]["name"])
    assert "configMap" in volume, f"{path}: the volume at {folder} is not a ConfigMap"
    name = volume["configMap"]["name"]
    found = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    assert found, f"{path}: ConfigMap {name!r} is not in the rendering"
    assert key in found[0].get("data", {}), f"{path}: ConfigMap {name!r} has no key {key!r}"
    return found[0]["data"][key]


def run_file(head: Doc, config: str, docs: list[Doc]) -> Path:
    """Where `--config` points on the head, as a local file: a mounted ConfigMap key, or a repository file
    the image holds (relative to the head's workingDir, the repository folder in the image)."""
    if Path(config).is_absolute():
        local = Path(tempfile.mkdtemp(prefix="k8s_run_")) / Path(config).name
        local.write_text(mounted_file(head, config, docs))
        return local
    assert head["containers"][0].get("workingDir") == dockerfile_workdir(trainer_dockerfile()), (
        "the head's workingDir must be the repository folder in the image, where relative paths resolve"
    )
    assert (REPO / config).is_file(), f"{config} does not exist in the repository"
    assert in_trainer_image(config), f"{config} is not copied into the trainer image"
    return REPO / config


def check_run(docs: list[Doc], entrypoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entrypoint, run on the head of the rendering's Ray resource, names existing files and its config
    resolves under the head's environment; the run's paths live on the shared PVC and its workers match the
    cluster's GPUs."""
    (doc,) = [d for d in docs if d["kind"] in RAY_KINDS]
    assert entrypoint_problems(entrypoint) == []
    module, config, overrides = split_entrypoint(entrypoint)
    assert module_file(module).is_file(), f"{module} is not {module_file(module)}"
    cluster = ray_cluster_spec(doc)
    head = cluster["headGroupSpec"]["template"]["spec"]
    head_container = head["containers"][0]
    local_config = run_file(head, config, docs)

    config_maps, claims = platform_index()
    env = container_env(head_container, config_maps)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # must come from the manifests
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(local_config, [expand_env(o, env) for o in overrides])

    assert cfg.tracking.enabled and cfg.tracking.uri == env["MLFLOW_TRACKING_URI"]
    assert cfg.tracking.uri.startswith("http://mlflow:"), cfg.tracking.uri
    assert cfg.dist.backend == "ray" and cfg.dist.use_gpu
    gpus = sum(
        (group.get("replicas", 1) or 0)
        * (gpu_count(group["template"]["spec"]["containers"][0], "limits") or 0)
        for group in cluster.get("workerGroupSpecs", [])
    )
    assert cfg.dist.num_workers == gpus, f"{cfg.dist.num_workers} Ray Train workers for {gpus} GPUs"

    shared = mount_paths(head, "horse-dist-data")
    for group in cluster.get("workerGroupSpecs", []):
        assert mount_paths(group["template"]["spec"], "horse-dist-data") == shared
    assert shared, "the head does not mount the data PVC"

    def on_pvc(path: str) -> bool:
        return any(Path(path).is_relative_to(m) for m in shared)

    assert on_pvc(cfg.train.out_dir), f"train.out_dir {cfg.train.out_dir} is not on the shared PVC"
    assert on_pvc(env["HF_HOME"]), "HF_HOME is not on the shared PVC"
    for path in (cfg.data.train_path, cfg.data.eval_path):
        if not path:
            continue
        if Path(path).is_absolute():
            assert on_pvc(path), f"{path} is neither in the repository nor on the shared PVC"
            assert path in readme_text(), f"README does not say how to stage {path}"
        else:
            assert (REPO / path).is_file(), f"{path} does not exist in the repository"


# ========================================================================================================
# Tests


def all_yaml_files() -> list[Path]:
    return sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")])


def kustomization_resource_files() -> set[Path]:
    used = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        for entry in yaml.safe_load(kustomization.read_text()).get("resources", []):
            path = (kustomization.parent / entry).resolve()
            if path.is_file():
                used.add(path)
    return used


def kustomization_input_files() -> set[Path]:
    """Files a kustomization reads that are not manifests: ConfigMap generator files, configurations."""
    used = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        entries = [*spec.get("configurations", [])]
        for generator in spec.get("configMapGenerator", []):
            entries += [item.rpartition("=")[2] for item in generator.get("files", [])]
        used |= {(kustomization.parent / entry).resolve() for entry in entries}
    return used


def manifest_files() -> list[Path]:
    inputs = kustomization_input_files()
    return [p for p in all_yaml_files() if p.name != "kustomization.yaml" and p.resolve() not in inputs]


def test_every_yaml_document_parses_and_every_manifest_is_used():
    files = all_yaml_files()
    assert {f.parent.relative_to(K8S).as_posix() for f in files if f.name == "kustomization.yaml"} == set(
        KUSTOMIZATIONS
    )
    used = kustomization_resource_files()
    inputs = kustomization_input_files()
    assert all(path.is_file() for path in inputs), inputs
    for path in files:
        docs = load_docs(path)  # raises on a YAML error
        assert docs, f"{path} is empty"
        if path.name == "kustomization.yaml" or path.resolve() in inputs:
            continue
        assert path.resolve() in used, f"{path} is not a resource of any kustomization (so never validated)"
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_source_manifests_validate(path):
    for doc in load_docs(path):
        assert schema_errors(doc) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_kustomizations_validate(name):
    docs = rendered(name)
    assert docs
    for doc in docs:
        assert schema_errors(doc) == []
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_rendered_resources():
    kinds = {
        name: sorted((d["kind"], d["metadata"]["name"]) for d in rendered(name)) for name in KUSTOMIZATIONS
    }
    assert kinds[PLATFORM] == [
        ("ConfigMap", "horse-dist-env"),
        ("Deployment", "mlflow"),
        ("PersistentVolumeClaim", "horse-dist-data"),
        ("PersistentVolumeClaim", "mlflow-artifacts"),
        ("Service", "mlflow"),
        ("Service", "mlflow-postgres"),
        ("StatefulSet", "mlflow-postgres"),
    ]
    assert kinds["base"] == [("ConfigMap", "horse-dist-run"), ("RayJob", "horse-dist-train")]
    assert kinds["overlays/llama2-7b-8gpu"] == [
        ("ConfigMap", "horse-dist-run-llama2-7b"),
        ("RayJob", "horse-dist-train-llama2-7b"),
    ]
    assert kinds["overlays/llama2-13b-8gpu-offload"] == [
        ("ConfigMap", "horse-dist-run-llama2-13b-offload"),
        ("RayJob", "horse-dist-train-llama2-13b-offload"),
    ]
    assert kinds["raycluster"] == [("RayCluster", "horse-dist-dev")]


def rayjob(name: str) -> Doc:
    (doc,) = [d for d in rendered(name) if d["kind"] == "RayJob"]
    return doc


def head_volumes(doc: Doc) -> dict[str, Doc]:
    return {
        v["name"]: v for v in doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    }


@pytest.mark.parametrize("name", [n for n in WORKLOADS if n != "raycluster"])
def test_rayjob_lifecycle(name):
    spec = rayjob(name)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"


def test_overlays_patch_the_base():
    base = rayjob("base")
    seven = rayjob("overlays/llama2-7b-8gpu")
    thirteen = rayjob("overlays/llama2-13b-8gpu-offload")
    # one entrypoint; each job's head mounts its own run file, the run.yaml beside its kustomization
    assert base["spec"]["entrypoint"] == seven["spec"]["entrypoint"] == thirteen["spec"]["entrypoint"]
    for name, doc in (
        ("base", base),
        ("overlays/llama2-7b-8gpu", seven),
        ("overlays/llama2-13b-8gpu-offload", thirteen),
    ):
        head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        config = split_entrypoint(doc["spec"]["entrypoint"])[1]
        assert mounted_file(head, config, rendered(name)) == (K8S / name / "run.yaml").read_text()

    def worker(doc: Doc) -> Doc:
        return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]

    for doc, memory, shm in ((seven, "480Gi", "64Gi"), (thirteen, "720Gi", "128Gi")):
        container = worker(doc)["containers"][0]
        assert container["resources"]["limits"]["memory"] == memory
        assert container["resources"]["limits"][GPU] == 8
        dshm = [v for v in worker(doc)["volumes"] if v["name"] == "dshm"]
        assert dshm[0]["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}
    # everything but the patched fields and the run file's ConfigMap is the base's
    for doc, suffix in ((seven, "-llama2-7b"), (thirteen, "-llama2-13b-offload")):
        assert head_volumes(doc)["run"]["configMap"]["name"] == "horse-dist-run" + suffix
        head_volumes(doc)["run"]["configMap"]["name"] = "horse-dist-run"
        assert (
            doc["spec"]["rayClusterSpec"]["headGroupSpec"] == base["spec"]["rayClusterSpec"]["headGroupSpec"]
        )


def test_run_configs_load_with_offload_only_for_13b(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    seven = load_config(K8S / "overlays/llama2-7b-8gpu/run.yaml")
    thirteen = load_config(K8S / "overlays/llama2-13b-8gpu-offload/run.yaml")
    smoke = load_config(K8S / "base/run.yaml")
    assert (seven.model.source, seven.dist.zero_stage, seven.dist.offload_params) == (
        "meta-llama/Llama-2-7b-hf",
        3,
        False,
    )
    assert (thirteen.model.source, thirteen.dist.zero_stage, thirteen.dist.offload_params) == (
        "meta-llama/Llama-2-13b-hf",
        3,
        True,
    )
    assert seven.data.n_edits == thirteen.data.n_edits == 8000
    assert smoke.model.source == "smollm2-135m"
    for cfg in (seven, thirteen):  # a RayJob retry resumes the same run folder
        assert cfg.train.run_name and cfg.train.resume_if_exists


@pytest.mark.parametrize("name", WORKLOADS)
def test_entrypoints_and_configs_resolve(name, monkeypatch):
    docs = rendered(name)
    (doc,) = [d for d in docs if d["kind"] in RAY_KINDS]
    if doc["kind"] == "RayJob":
        check_run(docs, doc["spec"]["entrypoint"], monkeypatch)
    else:  # the RayCluster: the README's `ray job submit` commands run on it
        submits = [line for line in readme_commands() if line.startswith("ray job submit")]
        assert len(submits) >= 2
        for line in submits:
            tokens = shlex.split(line)
            flags, entry = tokens[: tokens.index("--")], tokens[tokens.index("--") + 1 :]
            assert "--address" in flags, f"README's ray job submit has no --address: {line}"
            check_run(docs, shlex.join(entry), monkeypatch)


@pytest.mark.parametrize("name", WORKLOADS)
def test_gpu_pods(name):
    docs = rendered(name)
    assert [p for d in docs for p in gpu_policy_problems(d)] == []
    gpus = [gpu_count(c, "limits") for d in docs for _, _, pod in pod_templates(d) for c in pod["containers"]]
    assert 8 in gpus, "the worker group should hold an 8-GPU pod"


def test_references_exist():
    config_maps, claims = platform_index()
    secrets = readme_secrets()
    assert secrets == {"hf-token": {"HF_TOKEN"}, "mlflow-postgres": {"password"}}
    problems = [
        problem
        for name in KUSTOMIZATIONS
        for doc in rendered(name)
        for problem in reference_problems(
            doc, {**config_maps, **generated_config_maps(name)}, claims, secrets
        )
    ]
    assert problems == []
    assert "MLFLOW_TRACKING_URI" in config_maps["horse-dist-env"]


def generated_config_maps(name: str) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["data"] for d in rendered(name) if d["kind"] == "ConfigMap"}


def test_images_are_built_by_the_readme_and_pinned():
    builds = dockerfile_builds()
    assert set(builds.values()) == {K8S / "docker" / "Dockerfile", K8S / "docker" / "mlflow.Dockerfile"}
    used = {c["image"] for name in KUSTOMIZATIONS for d in rendered(name) for c in iter_containers(d)}
    assert set(builds) <= used, f"images built but never used: {set(builds) - used}"
    for image in used - set(builds):  # third-party images: an explicit, non-floating tag
        _, tag, digest = split_image(image)
        assert digest or (tag and tag != "latest"), f"{image} is not pinned"
    for image, dockerfile in builds.items():
        _, tag, _ = split_image(image)
        assert dockerfile_label(dockerfile, "org.opencontainers.image.version") == tag, (image, dockerfile)
        assert "docker push" in readme_text() and image in readme_text()

    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    trainer = [i for i, f in builds.items() if f == trainer_dockerfile()]
    assert trainer == [f"horse-dist:{version}"]
    ray_images = {c["image"] for name in WORKLOADS for d in rendered(name) for c in iter_containers(d)}
    assert ray_images == set(trainer), "every Ray pod runs the trainer image"

    trainer_args = dockerfile_args(trainer_dockerfile())
    mlflow_args = dockerfile_args(K8S / "docker" / "mlflow.Dockerfile")
    assert trainer_args["MLFLOW_VERSION"] == mlflow_args["MLFLOW_VERSION"]
    assert trainer_args["TORCH_VERSION"] == "2.13.0"
    assert re.search(
        r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", trainer_dockerfile().read_text(), re.M
    )
    for name in WORKLOADS:
        for doc in rendered(name):
            if doc["kind"] in RAY_KINDS:
                assert ray_cluster_spec(doc)["rayVersion"] == trainer_args["RAY_VERSION"]


def test_readme_commands():
    commands = readme_commands()
    applied = [shlex.split(c)[3] for c in commands if c.startswith("kubectl apply -k")]
    assert sorted(applied) == sorted(f"k8s/{name}" for name in KUSTOMIZATIONS)
    for line in commands:
        tokens = shlex.split(line, comments=True)
        if tokens[:2] == ["kubectl", "kustomize"] or tokens[:3] == ["kubectl", "apply", "-k"]:
            assert (REPO / tokens[-1] / "kustomization.yaml").is_file(), line
    text = "\n".join(commands)
    assert "kubectl -n horse-dist port-forward svc/mlflow 5000:5000" in text
    assert "kubectl -n horse-dist logs -f job/horse-dist-train-llama2-7b" in text
    assert "kubectl -n horse-dist port-forward svc/horse-dist-dev-head-svc 8265:8265" in text
    assert "ray job submit --address http://localhost:8265" in text
    for image in dockerfile_builds():
        assert "docker push" in text and image in text


def test_dockerignore_keeps_the_venv_out():
    ignore = (K8S / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[[line.strip() for line in ignore].index("**")] == "**"
    copied = re.findall(r"^COPY (?:--\S+ )*(\S+) ", trainer_dockerfile().read_text(), flags=re.M)
    for source in copied:
        assert (REPO / source).exists(), f"the Dockerfile copies missing {source}"


# --------------------------------------------------------------------------------------------------------
# The checks above can fail: each mistake below is caught.


def _rename(mapping: Doc, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _base_worker(doc: Doc) -> Doc:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def _first(docs: list[Doc], kind: str) -> Doc:
    return next(d for d in docs if d["kind"] == kind)


def _misspelt_rayjob_field(docs: list[Doc]) -> Doc:
    _rename(docs[0]["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish")
    return docs[0]


def _ray_start_param_not_a_string(docs: list[Doc]) -> Doc:
    docs[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    return docs[0]


def _worker_group_without_name(docs: list[Doc]) -> Doc:
    del docs[0]["spec"]["workerGroupSpecs"][0]["groupName"]
    return docs[0]


def _unknown_submission_mode(docs: list[Doc]) -> Doc:
    docs[0]["spec"]["submissionMode"] = "Batch"
    return docs[0]


def _typo_in_pod_template(docs: list[Doc]) -> Doc:
    _rename(_base_worker(docs[0])["containers"][0], "resources", "resource")
    return docs[0]


def _wrong_type_in_pod_template(docs: list[Doc]) -> Doc:
    _base_worker(docs[0])["tolerations"] = {"key": GPU}
    return docs[0]


def _misspelt_deployment_field(docs: list[Doc]) -> Doc:
    deployment = _first(docs, "Deployment")
    _rename(deployment["spec"], "replicas", "replica")
    return deployment


def _service_port_not_an_integer(docs: list[Doc]) -> Doc:
    service = _first(docs, "Service")
    service["spec"]["ports"][0]["port"] = "http"
    return service


SCHEMA_MISTAKES: dict[str, tuple[str, Callable[[list[Doc]], Doc]]] = {
    "misspelt RayJob field": ("base", _misspelt_rayjob_field),
    "rayStartParams value not a string": ("base", _ray_start_param_not_a_string),
    "worker group without groupName": ("raycluster", _worker_group_without_name),
    "unknown submissionMode": ("base", _unknown_submission_mode),
    "typo inside the RayJob's pod template": ("base", _typo_in_pod_template),
    "wrong type inside the pod template": ("base", _wrong_type_in_pod_template),
    "Deployment with a misspelt field": (PLATFORM, _misspelt_deployment_field),
    "Service port not an integer": (PLATFORM, _service_port_not_an_integer),
}


@pytest.mark.parametrize("mistake", SCHEMA_MISTAKES)
def test_schema_validation_catches(mistake):
    name, mutate = SCHEMA_MISTAKES[mistake]
    doc = mutate(rendered(name))
    assert schema_errors(doc) != []


def test_unknown_kind_is_not_silently_accepted():
    assert schema_errors(
        {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"}, "spec": {}}
    )
    assert schema_errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}})


def _gpu_mistake(doc: Doc, mistake: str) -> None:
    worker = _base_worker(doc)
    container = worker["containers"][0]
    if mistake == "requests != limits":
        container["resources"]["requests"][GPU] = 4
    elif mistake == "limit without request":
        del container["resources"]["requests"][GPU]
    elif mistake == "no toleration":
        del worker["tolerations"]
    elif mistake == "/dev/shm on disk":
        del next(v for v in worker["volumes"] if v["name"] == "dshm")["emptyDir"]["medium"]
    elif mistake == "no /dev/shm":
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/dev/shm"]
    elif mistake == "head may see host GPUs":
        del doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"]


GPU_MISTAKES = (
    "requests != limits",
    "limit without request",
    "no toleration",
    "/dev/shm on disk",
    "no /dev/shm",
    "head may see host GPUs",
)


@pytest.mark.parametrize("mistake", GPU_MISTAKES)
def test_gpu_policy_catches(mistake):
    doc = rayjob("base")
    assert gpu_policy_problems(doc) == []
    _gpu_mistake(doc, mistake)
    assert gpu_policy_problems(doc) != []


@pytest.mark.parametrize("field", ["secret", "secret key", "configmap", "pvc", "volume", "run file"])
def test_reference_check_catches(field):
    config_maps, claims = platform_index()
    config_maps |= generated_config_maps("base")
    doc = rayjob("base")
    assert reference_problems(doc, config_maps, claims, readme_secrets()) == []
    worker = _base_worker(doc)
    container = worker["containers"][0]
    if field == "secret":
        container["env"][0]["valueFrom"]["secretKeyRef"]["name"] = "hf-tokn"
    elif field == "secret key":
        container["env"][0]["valueFrom"]["secretKeyRef"]["key"] = "TOKEN"
    elif field == "configmap":
        container["envFrom"][0]["configMapRef"]["name"] = "horse-dist-environment"
    elif field == "pvc":
        worker["volumes"][0]["persistentVolumeClaim"]["claimName"] = "data"
    elif field == "run file":  # e.g. an overlay renamed the ConfigMap but not the head's reference to it
        head_volumes(doc)["run"]["configMap"]["name"] = "horse-dist-run-llama2-7b"
    else:
        container["volumeMounts"][0]["name"] = "scratch"
    assert reference_problems(doc, config_maps, claims, readme_secrets()) != []


@pytest.mark.parametrize(
    "entrypoint",
    [
        "python -m horse_dist.train --config /etc/horse-dist/run.yaml tracking.uri=$MLFLOW_TRACKING_URI",
        "cd /tmp; python -m horse_dist.train --config /etc/horse-dist/run.yaml",
        "python -m horse_dist.trainer --config /etc/horse-dist/run.yaml",
    ],
)
def test_entrypoint_check_catches(entrypoint):
    assert entrypoint_problems(entrypoint) != []


def test_expand_env():
    assert expand_env("a=$(X) b=${Y} c=$Z", {"X": "1", "Y": "2"}) == "a=1 b=2 c=dummy-Z"


@pytest.mark.parametrize(
    "entrypoint, error",
    [
        ("python -m horse_dist.train --config /etc/horse-dist/llama2-7b.yaml", AssertionError),
        ("python -m horse_dist.train --config /etc/horse/run.yaml", AssertionError),
        ("python -m horse_dist.train --config k8s/overlays/llama2-7b/run.yaml", AssertionError),
        ("python -m horse_dist.train --config k8s/base/kustomization.yaml", AssertionError),
        ("python -m horse_dist.train --config /etc/horse-dist/run.yaml dist.zero_stage=2", ConfigError),
        ("python -m horse_dist.train --config /etc/horse-dist/run.yaml dist.num_workers=4", AssertionError),
        ("python -m horse_dist.train --config /etc/horse-dist/run.yaml train.out_dir=runs", AssertionError),
        (
            "python -m horse_dist.train --config /etc/horse-dist/run.yaml data.eval_path=/data/x.json",
            AssertionError,
        ),
    ],
)
def test_run_check_catches(entrypoint, error, monkeypatch):
    with pytest.raises(error):
        check_run(rendered("overlays/llama2-7b-8gpu"), entrypoint, monkeypatch)


def test_run_check_needs_the_tracking_uri_from_the_manifests(monkeypatch):
    docs = rendered("base")
    doc = next(d for d in docs if d["kind"] == "RayJob")
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("envFrom")
    with pytest.raises(Exception, match="MLFLOW_TRACKING_URI"):
        check_run(docs, doc["spec"]["entrypoint"], monkeypatch)


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n")
    head = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\n"
    cases = {
        "commonLabels: {a: b}\n": "not supported",
        "patches: [{target: {kind: ConfigMap}, patch: 'data: {a: c}'}]\n": "JSON6902",
        "patches: [{target: {kind: Secret}, patch: '[{op: remove, path: /data}]'}]\n": "matches nothing",
        "patches: [{target: {kind: ConfigMap}, patch: '[{op: test, path: /data/a, value: c}]'}]\n": "test failed",
        "patches: [{target: {kind: ConfigMap}, patch: '[{op: replace, path: /data/z, value: c}]'}]\n": "not found",
    }
    for extra, message in cases.items():
        (tmp_path / "kustomization.yaml").write_text(head + extra)
        with pytest.raises(KustomizeError, match=message):
            render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        head
        + "namespace: ns\nnameSuffix: -s\n"
        + "patches: [{target: {kind: ConfigMap, name: x}, patch: '[{op: add, path: /data/c, value: d}]'}]\n"
    )
    (doc,) = render(tmp_path)
    assert doc["metadata"] == {"name": "x-s", "namespace": "ns"} and doc["data"] == {"a": "b", "c": "d"}


def _kustomization(folder: Path, text: str, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n" + text
    )
    for name, content in files.items():
        (folder / name.replace("__", ".")).write_text(content)
    return folder


POD = (
    "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
    "spec: {containers: [{name: c, image: i}], volumes: [{name: run, configMap: {name: run}}]}\n"
)
GENERATED = (
    "resources: [pod.yaml]\nconfigMapGenerator: [{name: run, files: [run.yaml]}]\n"
    "generatorOptions: {disableNameSuffixHash: true}\n"
)


def test_renderer_generates_config_maps_and_renames_declared_references(tmp_path):
    """An overlay replaces the base's generated ConfigMap and renames it; the declared reference follows."""
    config = "nameReference:\n- kind: ConfigMap\n  fieldSpecs:\n  - {kind: Pod, path: spec/volumes/configMap/name}\n"
    base = _kustomization(
        tmp_path / "base",
        GENERATED + "configurations: [refs.yaml]\n",
        pod__yaml=POD,
        run__yaml="a: 1\n",
        refs__yaml=config,
    )
    assert render(base)[1] == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "run"},
        "data": {"run.yaml": "a: 1\n"},
    }
    overlay = _kustomization(
        tmp_path / "overlay",
        "resources: [../base]\nnameSuffix: -x\ngeneratorOptions: {disableNameSuffixHash: true}\n"
        "configMapGenerator: [{name: run, behavior: replace, files: [run.yaml], literals: [k=v]}]\n",
        run__yaml="b: 2\n",
    )
    pod, config_map = render(overlay)
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"] == "run-x"
    assert config_map["data"] == {"run.yaml": "b: 2\n", "k": "v"}


def test_renderer_refuses_generators_it_cannot_render_exactly(tmp_path):
    cases = {
        # kustomize would hash the name
        "resources: [pod.yaml]\nconfigMapGenerator: [{name: run, files: [run.yaml]}]\n": "name hashes",
        GENERATED.replace("[run.yaml]", "[../run.yaml]"): "outside the kustomization root",
        GENERATED.replace("[run.yaml]", "[missing.yaml]"): "does not exist",
        GENERATED.replace("files: [run.yaml]", "behavior: merge, files: [run.yaml]"): "needs exactly one",
        GENERATED.replace("files: [run.yaml]", "literals: [novalue]"): "not KEY=VALUE",
        # a rename would leave the Pod's reference stale: kustomize's built-in references are not implemented
        GENERATED + "nameSuffix: -x\n": "reference to it is not declared",
    }
    (tmp_path / "run.yaml").write_text("a: 1\n")
    for text, message in cases.items():
        folder = _kustomization(tmp_path / "k", text, pod__yaml=POD, run__yaml="a: 1\n")
        with pytest.raises(KustomizeError, match=message):
            render(folder)


def test_split_image():
    assert split_image("host:5000/team/horse-dist:0.1.0") == ("host:5000/team/horse-dist", "0.1.0", None)
    assert split_image("postgres") == ("postgres", None, None)
    assert split_image("a/b@sha256:ff") == ("a/b", None, "sha256:ff")


def test_the_renderer_is_a_command(tmp_path):
    """`python k8s/kustomize_lite.py DIR` prints the rendered YAML; a folder without a kustomization is one
    error line and exit code 2."""
    tool = [sys.executable, str(REPO / "k8s" / "kustomize_lite.py")]
    done = subprocess.run([*tool, str(K8S / "overlays" / "llama2-7b-8gpu")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("RayJob", "horse-dist-train-llama2-7b"),
        ("ConfigMap", "horse-dist-run-llama2-7b"),
    ]
    assert docs == rendered("overlays/llama2-7b-8gpu")
    bad = subprocess.run([*tool, str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path} has no kustomization.yaml"
