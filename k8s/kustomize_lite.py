"""A small `kubectl kustomize` for the kustomizations in k8s/: resources, namespace, name prefix/suffix,
JSON6902 patches and images (what these files use), and a clear error for anything else. The tests
(tests/test_k8s.py) render every kustomization with it; without kubectl it shows what one produces:

    python k8s/kustomize_lite.py k8s/overlays/llama2-7b-8gpu
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]


class KustomizeError(Exception):
    pass


KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "patches",
    "images",
    "namePrefix",
    "nameSuffix",
}


def load_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _matches(doc: Doc, target: dict[str, str]) -> bool:
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unsupported:
        raise KustomizeError(f"patch target keys {sorted(unsupported)} are not supported here")
    group, version = _split_api_version(doc["apiVersion"])
    actual = {
        "group": group,
        "version": version,
        "kind": doc["kind"],
        "name": doc["metadata"]["name"],
        "namespace": doc["metadata"].get("namespace", ""),
    }
    return all(actual[key] == value for key, value in target.items())


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with '/'")
    return [token.replace("~1", "/").replace("~0", "~") for token in path.split("/")[1:]]


def json6902(doc: Doc, ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add / remove / replace / test, in place."""
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        tokens = _pointer(path)
        try:
            parent: Any = doc
            for token in tokens[:-1]:
                parent = parent[int(token)] if isinstance(parent, list) else parent[token]
            last = tokens[-1]
            if isinstance(parent, list):
                index = len(parent) if (last == "-" and kind == "add") else int(last)
                if kind != "add" and not 0 <= index < len(parent):
                    raise IndexError(index)
                key: Any = index
            else:
                key = last
                if kind != "add" and key not in parent:
                    raise KeyError(key)
            if kind == "test":
                if parent[key] != op["value"]:
                    raise KustomizeError(f"test failed at {path}: {parent[key]!r} != {op['value']!r}")
            elif kind == "replace":
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "add":
                if isinstance(parent, list):
                    parent.insert(key, copy.deepcopy(op["value"]))
                else:
                    parent[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[key]
            else:
                raise KustomizeError(f"JSON6902 op {kind!r} is not supported here")
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise KustomizeError(f"{kind} {path}: path not found ({err!r})") from None


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """'host:5000/ns/name:tag@sha256:...' -> (name, tag, digest)."""
    ref, _, digest = ref.partition("@")
    slash, colon = ref.rfind("/"), ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :], digest or None
    return ref, None, digest or None


def join_image(name: str, tag: str | None, digest: str | None) -> str:
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def iter_containers(node: Any) -> Iterator[Doc]:
    """Every container anywhere in a resource (kustomize's image transformer looks in all
    `containers` / `initContainers` lists, custom resources included)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from iter_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_containers(item)


def _set_images(resources: list[Doc], entry: dict[str, str]) -> None:
    unsupported = set(entry) - {"name", "newName", "newTag", "digest"}
    if unsupported:
        raise KustomizeError(f"images keys {sorted(unsupported)} are not supported here")
    for resource in resources:
        for container in iter_containers(resource):
            name, tag, digest = split_image(container["image"])
            if name == entry["name"]:
                container["image"] = join_image(
                    entry.get("newName", name), entry.get("newTag", tag), entry.get("digest", digest)
                )


def render(directory: Path) -> list[Doc]:
    """`kubectl kustomize DIRECTORY` for the features k8s/ uses."""
    kustomization = directory / "kustomization.yaml"
    if not kustomization.is_file():
        raise KustomizeError(f"{directory} has no kustomization.yaml")
    spec = yaml.safe_load(kustomization.read_text())
    unsupported = set(spec) - KUSTOMIZATION_KEYS
    if unsupported:
        raise KustomizeError(
            f"{kustomization}: keys {sorted(unsupported)} are not supported by this renderer"
        )
    if (spec.get("apiVersion"), spec.get("kind")) != ("kustomize.config.k8s.io/v1beta1", "Kustomization"):
        raise KustomizeError(f"{kustomization}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    resources: list[Doc] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            resources += render(target)
        elif target.is_file():
            if directory.resolve() not in target.parents:  # kustomize's load restrictor
                raise KustomizeError(f"{kustomization}: file {entry} is outside the kustomization root")
            resources += copy.deepcopy(load_docs(target))
        else:
            raise KustomizeError(f"{kustomization}: resource {entry} does not exist")
    for patch in spec.get("patches", []):
        unsupported = set(patch) - {"target", "patch", "path"}
        if unsupported or "target" not in patch:
            raise KustomizeError(
                f"{kustomization}: patches need a target and patch/path; got {sorted(patch)}"
            )
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            raise KustomizeError(f"{kustomization}: only JSON6902 (list) patches are supported here")
        matched = [r for r in resources if _matches(r, patch["target"])]
        if not matched:
            raise KustomizeError(f"{kustomization}: patch target {patch['target']} matches nothing")
        for resource in matched:
            json6902(resource, ops)
    for resource in resources:
        meta = resource["metadata"]
        if "namespace" in spec:
            meta["namespace"] = spec["namespace"]
        meta["name"] = spec.get("namePrefix", "") + meta["name"] + spec.get("nameSuffix", "")
    for entry in spec.get("images", []):
        _set_images(resources, entry)
    ids = [
        (r["apiVersion"], r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) for r in resources
    ]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise KustomizeError(f"{kustomization}: duplicate resources {sorted(map(str, duplicates))}")
    return resources


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())  # noqa: T201
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        docs = render(Path(argv[0]))
    except KustomizeError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
