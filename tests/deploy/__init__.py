"""Helpers shared by the deployment tests: load the manifests, validate them, find the external tools.

``validate`` checks one document against the Kubernetes 1.33 JSON schemas (strict: unknown fields
fail), the Prometheus Operator models for the CRDs we use, and the rules the schemas leave out
(names, label syntax, quantities). Every message names the file, the object and the path of the field.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pydantic
import yaml
from cloudcoil.models.prometheus_operator import v1 as prometheus_v1

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
DOCKER = REPO / "docker"
K8S_VERSION = "1.33"

# Custom resources have no schema in kubernetes-validate: these are checked with typed models instead.
# Anything else without a schema (a typo in apiVersion, a removed API such as policy/v1beta1) fails.
CRD_MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_v1.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): prometheus_v1.PrometheusRule,
}
TOOL_CONFIG_KINDS = {"Kustomization", "Component"}  # kustomize's own files: not objects sent to the API server

# Objects whose names end up in DNS (RFC 1123 label); everything else is a DNS subdomain.
_DNS_LABEL_KINDS = {"Service", "Namespace"}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Doc:
    """One YAML document and where it came from."""

    source: str  # a path relative to the repo, or the command that produced it
    index: int  # position of the document in its source
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", "?"))

    @property
    def name(self) -> str:
        return str((self.body.get("metadata") or {}).get("name", "?"))

    @property
    def where(self) -> str:
        return f"{self.source} (document {self.index}, {self.kind}/{self.name})"


def rel(path: Path) -> str:
    """A path as messages show it: relative to the repo when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def field_path(parts: Any) -> str:
    """``['spec', 'containers', 0, 'image']`` -> ``spec.containers[0].image``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<document root>"


def parse(text: str, source: str) -> list[Doc]:
    return [Doc(source, i, body) for i, body in enumerate(yaml.safe_load_all(text)) if body]


def load_file(path: Path) -> list[Doc]:
    """The documents of one file (parsed once per run; callers must not modify them)."""
    return list(_load_cached(path.resolve(), path.stat().st_mtime_ns))


@functools.cache
def _load_cached(path: Path, mtime_ns: int) -> tuple[Doc, ...]:
    return tuple(parse(path.read_text(), rel(path)))


def manifest_files() -> list[Path]:
    """Every YAML file under k8s/, the kustomizations included."""
    return sorted(K8S.rglob("*.yaml"))


def objects(docs: list[Doc]) -> list[Doc]:
    """The documents that are Kubernetes objects (not kustomize configuration)."""
    return [d for d in docs if d.kind not in TOOL_CONFIG_KINDS]


def base_objects() -> list[Doc]:
    """The objects of the base: the files the base kustomization lists, in its order, then the ConfigMaps its
    components generate."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [d for name in kustomization["resources"] for d in load_file(K8S / name)]
    return docs + [d for name in kustomization.get("components", []) for d in generated_config_maps(K8S / name)]


def generated_config_maps(folder: Path) -> list[Doc]:
    """The ConfigMaps of a kustomization's ``configMapGenerator`` (``files`` entries, no name hash), as kustomize
    builds them; test_manifest_schema compares them with ``kubectl kustomize``."""
    path = folder / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    docs = []
    for i, gen in enumerate(kustomization.get("configMapGenerator") or []):
        options = gen.get("options") or {}
        assert options.get("disableNameSuffixHash"), f"{rel(path)}: {gen['name']} would get a hashed name"
        assert set(gen) <= {"name", "files", "options"}, f"{rel(path)}: {sorted(gen)} is more than this reads"
        data = {}
        for entry in gen["files"]:
            key, _, source = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (folder / source).read_text()
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": gen["name"], "labels": dict(options.get("labels") or {})}, "data": data}
        docs.append(Doc(f"{rel(path)} configMapGenerator", i, body))
    return docs


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d.kind == kind and d.name == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {[d.where for d in matches]}"
    return matches[0]


def pyproject_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


# --- validation --------------------------------------------------------------------------------------


def validate(doc: Doc) -> list[str]:
    """Every problem found in one document, each as 'source (document, Kind/name): field.path: what'."""
    problems = [f"{field_path(path)}: {message}" for path, message in _schema_problems(doc.body)]
    problems += [f"{field_path(path)}: {message}" for path, message in _semantic_problems(doc.body)]
    return [f"{doc.where}: {p}" for p in problems]


def _schema_problems(body: dict[str, Any]) -> list[tuple[list[Any], str]]:
    if not isinstance(body.get("apiVersion"), str) or not isinstance(body.get("kind"), str):
        return [([], "a manifest needs string fields apiVersion and kind")]
    model = CRD_MODELS.get((body["apiVersion"], body["kind"]))
    if model is not None:
        return _crd_problems(model, body)
    try:
        kubernetes_validate.validate(body, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = list(exc.path)
        if exc.validator == "additionalProperties" and isinstance(exc.instance, dict):
            known = set((exc.schema or {}).get("properties", {}))
            return [
                (path + [extra], f"unknown field {extra!r} (allowed: {', '.join(sorted(known))})")
                for extra in sorted(set(exc.instance) - known)
            ]
        return [(path, exc.message)]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [
            (
                ["apiVersion"],
                f"no schema for kind {exc.kind} in {exc.api_version} on Kubernetes "
                f"{K8S_VERSION}: a misspelt or removed API, or a custom resource missing from CRD_MODELS",
            )
        ]
    return []


def _crd_problems(model: type[pydantic.BaseModel], body: dict[str, Any]) -> list[tuple[list[Any], str]]:
    try:
        parsed = model.model_validate(body)
    except pydantic.ValidationError as exc:
        return [(list(err["loc"]), err["msg"]) for err in exc.errors()]
    # The models ignore unknown fields: whatever did not survive the round trip was not understood.
    dumped = json.loads(json.dumps(parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")))
    return [
        (path, f"{what} (not in the {body['kind']} schema)")
        for path, what in _round_trip_diff(body, dumped, [])
    ]


def _round_trip_diff(original: Any, dumped: Any, path: list[Any]) -> Iterator[tuple[list[Any], str]]:
    if isinstance(original, dict) and isinstance(dumped, dict):
        for key, value in original.items():
            if key not in dumped:
                yield path + [key], f"unknown field {key!r}"
            else:
                yield from _round_trip_diff(value, dumped[key], path + [key])
    elif isinstance(original, list) and isinstance(dumped, list) and len(original) == len(dumped):
        for i, (a, b) in enumerate(zip(original, dumped, strict=True)):
            yield from _round_trip_diff(a, b, path + [i])
    elif original != dumped:
        yield path, f"value {original!r} was read as {dumped!r}"


def _semantic_problems(body: dict[str, Any]) -> Iterator[tuple[list[Any], str]]:
    """What the JSON schemas do not check: names, labels, quantities, port names."""
    meta = body.get("metadata") or {}
    name = meta.get("name")
    pattern = _DNS_LABEL if body.get("kind") in _DNS_LABEL_KINDS else _DNS_SUBDOMAIN
    if (
        not isinstance(name, str)
        or len(name) > (63 if pattern is _DNS_LABEL else 253)
        or not pattern.match(name)
    ):
        yield ["metadata", "name"], f"{name!r} is not a valid name (lower-case RFC 1123)"
    for path, node in _walk(body, []):
        last = path[-1] if path else None
        if last in ("labels", "matchLabels") and isinstance(node, dict):
            for key, value in node.items():
                yield from _label_problems(path + [key], key, value)
        elif last in ("requests", "limits") and isinstance(node, dict) and "resources" in path:
            for key, value in node.items():
                if not _QUANTITY.match(str(value)):
                    yield path + [key], f"{value!r} is not a quantity (e.g. 500m, 2, 16Gi)"
        elif last == "sizeLimit" and not _QUANTITY.match(str(node)):
            yield path, f"{node!r} is not a quantity (e.g. 1Gi)"
        elif last == "ports" and isinstance(node, list):
            for i, port in enumerate(node):
                port_name = port.get("name") if isinstance(port, dict) else None
                if port_name is not None and (len(port_name) > 15 or not _PORT_NAME.match(port_name)):
                    yield path + [i, "name"], f"{port_name!r} is not a port name (<= 15 of a-z, 0-9, '-')"


def _label_problems(path: list[Any], key: str, value: Any) -> Iterator[tuple[list[Any], str]]:
    prefix, _, label = key.rpartition("/")
    if (prefix and not _DNS_SUBDOMAIN.match(prefix)) or len(label) > 63 or not _LABEL_NAME.match(label):
        yield path, f"{key!r} is not a valid label key"
    if not isinstance(value, str):
        yield path, f"label values are strings; {value!r} is a {type(value).__name__} (quote it)"
    elif len(value) > 63 or not _LABEL_VALUE.match(value):
        yield path, f"{value!r} is not a valid label value"


def _walk(node: Any, path: list[Any]) -> Iterator[tuple[list[Any], Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, path + [key])
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, path + [i])


# --- external tools ----------------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """A command-line tool: the one installed beside this interpreter (the venv) first, then PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def run(args: list[str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def kustomize(folder: Path, *flags: str) -> list[Doc]:
    """``kubectl kustomize FOLDER`` parsed into documents (the caller skips when kubectl is absent)."""
    kubectl = tool("kubectl")
    assert kubectl is not None
    done = run([kubectl, "kustomize", *flags, str(folder)])
    assert done.returncode == 0, f"kubectl kustomize {rel(folder)} failed:\n{done.stderr}"
    return parse(done.stdout, f"kubectl kustomize {' '.join(flags + (rel(folder),))}")


def kubectl_kustomize_works() -> bool:
    kubectl = tool("kubectl")
    return kubectl is not None and run([kubectl, "version", "--client"]).returncode == 0
