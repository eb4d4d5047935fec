"""A small `kubectl kustomize` for the kustomizations in k8s/: resources, ConfigMap generators (files and
literals, without name hashes), namespace, name prefix/suffix with the name references that `configurations`
declare, JSON6902 patches and images (what these files use), and a clear error for anything else. The tests
(tests/test_k8s.py) render every kustomization with it; without kubectl it shows what one produces:

    python k8s/kustomize_lite.py k8s/overlays/llama2-7b-8gpu
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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
    "configMapGenerator",
    "generatorOptions",
    "configurations",
}
# Where workloads name a ConfigMap. kustomize rewrites these built-in references on a rename; this renderer
# only rewrites the ones `configurations` declare and refuses a rename that would leave one of these stale.
CONFIG_MAP_REFERENCES = ("configMap", "configMapRef", "configMapKeyRef")


@dataclass(frozen=True)
class FieldSpec:
    """A field that holds a resource's name (kustomize's fieldSpec): `path` walks maps, and lists on its way."""

    kind: str
    path: tuple[str, ...]
    group: str | None = None


@dataclass
class Build:
    """A kustomization's resources and, per referenced kind, the fields that name such a resource (its own
    `configurations` and its bases', merged upwards as kustomize does)."""

    resources: list[Doc]
    references: dict[str, list[FieldSpec]]


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


def _inside(directory: Path, entry: str, kustomization: Path) -> Path:
    """A file of the kustomization; kustomize's load restrictor refuses anything outside its folder."""
    target = (directory / entry).resolve()
    if directory.resolve() not in target.parents:
        raise KustomizeError(f"{kustomization}: file {entry} is outside the kustomization root")
    if not target.is_file():
        raise KustomizeError(f"{kustomization}: file {entry} does not exist")
    return target


def _config_map_data(entry: Doc, directory: Path, kustomization: Path) -> dict[str, str]:
    data: dict[str, str] = {}
    for item in entry.get("files", []):
        key, _, path = item.rpartition("=")
        target = _inside(directory, path, kustomization)
        data[key or target.name] = target.read_text()
    for item in entry.get("literals", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise KustomizeError(f"{kustomization}: literal {item!r} is not KEY=VALUE")
        data[key] = value
    return data


def _generate_config_maps(spec: Doc, directory: Path, kustomization: Path, resources: list[Doc]) -> None:
    """configMapGenerator: `create` appends a ConfigMap; `replace` / `merge` change one from a base."""
    generators = spec.get("configMapGenerator", [])
    if generators and spec.get("generatorOptions") != {"disableNameSuffixHash": True}:
        # kustomize would append a content hash to the name; this renderer does not compute it
        raise KustomizeError(
            f"{kustomization}: name hashes are not supported here; set generatorOptions: "
            "{disableNameSuffixHash: true}"
        )
    for entry in generators:
        unsupported = set(entry) - {"name", "behavior", "files", "literals"}
        if unsupported:
            raise KustomizeError(
                f"{kustomization}: configMapGenerator keys {sorted(unsupported)} are not supported"
            )
        data = _config_map_data(entry, directory, kustomization)
        behavior = entry.get("behavior", "create")
        existing = [
            r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == entry["name"]
        ]
        if behavior == "create":
            resources.append(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": entry["name"]}, "data": data}
            )
        elif behavior in ("replace", "merge") and len(existing) == 1:
            existing[0]["data"] = data if behavior == "replace" else {**existing[0].get("data", {}), **data}
        else:
            raise KustomizeError(
                f"{kustomization}: configMapGenerator {entry['name']!r}: behavior {behavior!r} needs exactly one "
                f"ConfigMap of that name from a base (found {len(existing)})"
            )


def _load_references(spec: Doc, directory: Path, kustomization: Path) -> dict[str, list[FieldSpec]]:
    """The `nameReference` entries of the kustomization's `configurations` files."""
    references: dict[str, list[FieldSpec]] = {}
    for entry in spec.get("configurations", []):
        config = yaml.safe_load(_inside(directory, entry, kustomization).read_text()) or {}
        if set(config) - {"nameReference"}:
            raise KustomizeError(f"{entry}: only nameReference configurations are supported here")
        for reference in config.get("nameReference", []):
            references.setdefault(reference["kind"], []).extend(
                FieldSpec(f["kind"], tuple(f["path"].split("/")), f.get("group"))
                for f in reference.get("fieldSpecs", [])
            )
    return references


def _field_holders(node: Any, path: tuple[str, ...]) -> Iterator[Doc]:
    """The maps holding the last key of `path` in `node`; lists on the way are walked item by item."""
    if isinstance(node, list):
        for item in node:
            yield from _field_holders(item, path)
    elif isinstance(node, dict):
        if len(path) == 1:
            if path[0] in node:
                yield node
        elif path[0] in node:
            yield from _field_holders(node[path[0]], path[1:])


def _stale_config_map_references(node: Any, name: str) -> bool:
    if isinstance(node, list):
        return any(_stale_config_map_references(item, name) for item in node)
    if not isinstance(node, dict):
        return False
    return any(
        (key in CONFIG_MAP_REFERENCES and isinstance(value, dict) and value.get("name") == name)
        or _stale_config_map_references(value, name)
        for key, value in node.items()
    )


def _rename_references(build: Build, renames: dict[tuple[str, str], str], kustomization: Path) -> None:
    for (kind, old), new in renames.items():
        for field in build.references.get(kind, []):
            for resource in build.resources:
                group, _ = _split_api_version(resource["apiVersion"])
                if resource["kind"] != field.kind or (field.group is not None and group != field.group):
                    continue
                for holder in _field_holders(resource, field.path):
                    if holder[field.path[-1]] == old:
                        holder[field.path[-1]] = new
        if kind == "ConfigMap" and any(_stale_config_map_references(r, old) for r in build.resources):
            raise KustomizeError(
                f"{kustomization}: ConfigMap {old!r} became {new!r} but a reference to it is not declared in "
                "`configurations` (kustomize's built-in references are not implemented here)"
            )


def _build(directory: Path) -> Build:
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
    build = Build([], _load_references(spec, directory, kustomization))
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            base = _build(target)
            build.resources += base.resources
            for kind, fields in base.references.items():
                build.references.setdefault(kind, []).extend(fields)
        else:
            build.resources += load_docs(_inside(directory, entry, kustomization))
    _generate_config_maps(spec, directory, kustomization, build.resources)
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
        matched = [r for r in build.resources if _matches(r, patch["target"])]
        if not matched:
            raise KustomizeError(f"{kustomization}: patch target {patch['target']} matches nothing")
        for resource in matched:
            json6902(resource, ops)
    renames = {}
    for resource in build.resources:
        meta = resource["metadata"]
        if "namespace" in spec:
            meta["namespace"] = spec["namespace"]
        new = spec.get("namePrefix", "") + meta["name"] + spec.get("nameSuffix", "")
        if new != meta["name"]:
            renames[(resource["kind"], meta["name"])] = new
        meta["name"] = new
    _rename_references(build, renames, kustomization)
    for entry in spec.get("images", []):
        _set_images(build.resources, entry)
    ids = [
        (r["apiVersion"], r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"])
        for r in build.resources
    ]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise KustomizeError(f"{kustomization}: duplicate resources {sorted(map(str, duplicates))}")
    return build


def render(directory: Path) -> list[Doc]:
    """`kubectl kustomize DIRECTORY` for the features k8s/ uses."""
    return _build(directory).resources


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (a generated ConfigMap's files) as `|` blocks, as kustomize prints them."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text and not any(line != line.rstrip() for line in text.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _str)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())  # noqa: T201
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        docs = render(Path(argv[0]))
    except KustomizeError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    print(yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False), end="")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
