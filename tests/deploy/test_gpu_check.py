"""``benchmarks/gpu_check.sh``, the prepared GPU check, and its load generator ``benchmarks/openai_load.py``.

The check itself needs an NVIDIA GPU; here the script is parsed (``bash -n``), linted (shellcheck, installed from
Debian when missing and possible), kept in step with the project (its vLLM version, its documented settings),
and run in its dry form: the built-in engine and the tiny model on this CPU, seconds per level, through the same
load generator, publish and report as on a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from . import REPO, run, tool

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _module(path: Path) -> ModuleType:
    """A benchmark module by its path (benchmarks/ is no package, and stays off sys.path)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


openai_load = _module(REPO / "benchmarks" / "openai_load.py")


def _shellcheck() -> str | None:
    """shellcheck, installed from Debian's archive when missing and this is root on Debian (as `make test` is)."""
    found = tool("shellcheck")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "shellcheck"], capture_output=True, timeout=600,
                       check=False, env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
        found = tool("shellcheck")
    return found


def test_the_script_parses() -> None:
    done = run(["bash", "-n", str(SCRIPT)])
    assert done.returncode == 0, done.stderr
    assert os.access(SCRIPT, os.X_OK), "benchmarks/gpu_check.sh is not executable"


def test_shellcheck_is_clean() -> None:
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed and cannot be installed here (apt-get install shellcheck)")
    done = run([shellcheck, "--severity=style", str(SCRIPT)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_it_installs_the_projects_vllm() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = extras["vllm"]
    default = re.search(r"^VLLM_VERSION=\$\{VLLM_VERSION:-([\w.]+)\}$", SCRIPT.read_text(), re.M)
    assert default and pin == f"vllm=={default.group(1)}", (pin, default and default.group(1))


def test_every_setting_it_reads_is_documented_in_its_header() -> None:
    text = SCRIPT.read_text()
    header = text[: text.index("set -euo pipefail")]
    read = set(re.findall(r"\$\{(GPU_CHECK_\w+)", text))
    assert read, "the script reads no GPU_CHECK_* settings?"
    undocumented = sorted(name for name in read if name not in header)
    assert not undocumented, f"benchmarks/gpu_check.sh reads {undocumented} but its header does not list them"


def test_it_stops_what_it_started_on_exit() -> None:
    text = SCRIPT.read_text()
    assert re.search(r"^trap on_exit EXIT$", text, re.M)
    assert "stop_group" in text[text.index("on_exit() {"):text.index("trap on_exit EXIT")]


# --- the load generator's judgement -------------------------------------------------------------------------

REFS = {0: {p: f"zero answer to {p}" for p in openai_load.PROMPTS},
        1: {p: f"one! other text for {p}" for p in openai_load.PROMPTS}}
PROMPT = openai_load.PROMPTS[0]


def _answer(header: int | None, body: int | None, text: str) -> openai_load.Answer:
    return openai_load.Answer(0.0, 1.0, PROMPT, True, 0.1, 8, text, header, body)


def test_an_answer_is_mislabelled_when_its_text_is_the_other_versions() -> None:
    assert openai_load.mislabelled(_answer(0, 0, REFS[0][PROMPT]), REFS) is None
    assert openai_load.mislabelled(_answer(1, 1, REFS[1][PROMPT][:12] + "diverged later"), REFS) is None
    assert "another version" in (openai_load.mislabelled(_answer(1, 1, REFS[0][PROMPT]), REFS) or "")
    assert "header v0 != body v1" in (openai_load.mislabelled(_answer(0, 1, REFS[0][PROMPT]), REFS) or "")
    assert "never served" in (openai_load.mislabelled(_answer(7, 7, REFS[0][PROMPT]), REFS) or "")


def test_versions_are_read_from_header_and_body() -> None:
    assert openai_load._version("3") == 3
    assert openai_load._version("lockstep@v12") == 12
    assert openai_load._version("raw") is None and openai_load._version(None) is None


def test_throughput_counts_the_tokens_streamed_inside_the_window() -> None:
    # 11 tokens: the first at 1 s, the other ten evenly up to 11 s.
    answer = openai_load.Answer(0.0, 11.0, PROMPT, True, 1.0, 11)
    assert openai_load.tokens_within(answer, 0.0, 100.0) == 11
    assert openai_load.tokens_within(answer, 0.0, 6.0) == 6  # a burst cut by the window counts in part
    assert openai_load.tokens_within(answer, 6.0, 100.0) == 5
    assert openai_load.tokens_within(answer, 20.0, 30.0) == 0
    assert openai_load.tokens_within(openai_load.Answer(0.0, 1.0, PROMPT, False), 0.0, 9.0) == 0


def test_the_longest_gap_counts_the_window_edges() -> None:
    assert openai_load.longest_gap([2.0, 3.0], 0.0, 10.0) == 7.0
    assert openai_load.longest_gap([], 0.0, 4.0) == 4.0


def test_the_report_says_what_was_not_measured() -> None:
    level = {"concurrency": 1, "tokens_per_s": 10.0, "ttft_p50_s": 0.02, "failed": 0}
    table = openai_load.report_table(None, {"levels": [level]}, None)
    assert "raw vLLM: not measured" in table and "| 1 | n/a | 10.0 | n/a | n/a / 20 ms | n/a / 0 |" in table


# --- the dry run: the whole script on this CPU ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_the_dry_run_measures_and_swaps_cleanly(tmp_path: Path, builtin_dir: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "models").symlink_to(builtin_dir)  # tiny-s0 and tiny-s1, built once per session
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "LOCKSTEP_"))}
    env |= {"GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_DIR": str(work), "GPU_CHECK_PYTHON": sys.executable,
            "GPU_CHECK_CLIENTS": "2", "GPU_CHECK_LEVEL_S": "2", "GPU_CHECK_TOKENS": "8",
            "GPU_CHECK_SWAP_CLIENTS": "2", "OUT": str(out)}
    done = subprocess.run([str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=570)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "raw vLLM: not measured" in done.stdout and "| lockstep v0 → v1 | 0 | 2 |" in done.stdout, done.stdout
    result = json.loads((out / "gpu_check.json").read_text())
    swap = result["swap"]
    assert swap["failed"] == 0 and swap["mislabelled"] == 0 and swap["old_version_after_flip"] == 0, swap
    assert swap["versions_distinguishable"] and set(swap["answers_by_version"]) == {"v0", "v1"}, swap
    assert [lv["concurrency"] for lv in result["lockstep"]["levels"]] == [2]
    assert all(lv["failed"] == 0 and lv["tokens_per_s"] > 0 for lv in result["lockstep"]["levels"])
    assert result["meta"]["replica"]["engine"] == "builtin"
    assert (out / "gpu_check_logs" / "lockstep.log").is_file()
