"""Replicas over real HTTP (in this process or as a child process) and the text each model must produce."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from lockstep.core.http_server import server_config
from lockstep.core.settings import Settings
from lockstep.inference.app import create_app
from lockstep.inference.runtime import ReplicaRuntime
from lockstep.models.refs import parse_ref
from tests.support.cluster import Proc, base_env, free_port, spawn, wait_for

PROMPTS = ("Once upon a time", "The cat sat on", "One, two, three,", "Colours of the sky")
MAX_NEW = 8  # tokens per answer: short, so many answers straddle each swap on a 2-core machine
BOOT_S = 120.0  # generous bounds for a shared, loaded machine; loops below are bounded by them
SWAP_S = 120.0


@lru_cache(maxsize=64)
def reference_text(model_dir: Path, prompt: str, n: int = MAX_NEW, chat: bool = False) -> str:
    """What greedy decoding of ``model_dir`` writes after ``prompt``: an independent loop over the model's own
    forward pass (whole sequence each step, no cache, no batching), decoded with its tokenizer."""
    model, tok = _model(model_dir)
    if chat:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    else:
        ids = list(tok(prompt)["input_ids"])
    start = len(ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from two threads, and loses much on a busy machine
    try:
        with torch.inference_mode():
            for _ in range(n):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
    finally:
        torch.set_num_threads(threads)
    return str(tok.decode(ids[start:]))


@lru_cache(maxsize=8)
def _model(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def builtin_seed(model_ref: str) -> int:
    """``builtin:tiny-s2`` → 2 (the X-Model-Repo-Id of an answer names the model that wrote it)."""
    ref = parse_ref(model_ref)
    assert ref.builtin is not None and ref.builtin.startswith("tiny-s"), model_ref
    return int(ref.builtin.removeprefix("tiny-s"))


def replica_settings(builtin_dir: Path, **overrides: Any) -> Settings:
    """Settings of an in-process replica: the session's built-in models, offline, CPU, no shared folder."""
    base: dict[str, Any] = {
        "builtin_dir": builtin_dir,
        "hf_hub_offline": True,
        "device": "cpu",
        "dtype": "float32",  # the references are float32 (auto picks bfloat16 on CPUs with AMX-BF16/AVX512-BF16)
        "shared_dir": None,
        "replica_id": "test-replica",
        "api_token": None,
    }
    return Settings(**{**base, **overrides})


@dataclass
class Served:
    """A replica app answering on 127.0.0.1 from a thread of this process."""

    url: str
    app: FastAPI

    @property
    def runtime(self) -> ReplicaRuntime:
        return self.app.state.runtime  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return httpx.get(self.url + "/status", timeout=10).json()  # type: ignore[no-any-return]


@contextmanager
def served(
    settings: Settings, runtime: ReplicaRuntime | None = None, wait_ready: bool = True
) -> Iterator[Served]:
    """Run ``create_app(settings)`` under uvicorn in a thread; stop it (and its engines) on exit.

    Torch runs one thread meanwhile, as child replicas do (OMP_NUM_THREADS=1 in ``base_env``): a tiny model
    gains nothing from a second one, and OpenMP spin-waits make it many times slower on a busy 2-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    port = free_port()
    app = create_app(settings, runtime=runtime)
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    srv = Served(f"http://127.0.0.1:{port}", app)
    try:
        wait_for(lambda: server.started, 60, 0.02, "uvicorn started")
        if wait_ready:
            wait_ready_200(srv.url)
        yield srv
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        torch.set_num_threads(threads)


def wait_ready_200(url: str, timeout: float = BOOT_S) -> None:
    wait_for(
        lambda: httpx.get(url + "/ready", timeout=5).status_code == 200, timeout, 0.05, f"{url}/ready 200"
    )


def wait_serving(url: str, version: int, timeout: float = SWAP_S) -> dict[str, Any]:
    """Poll /status until the replica serves ``version`` and nothing is loading; return that status."""

    def check() -> dict[str, Any] | None:
        st = httpx.get(url + "/status", timeout=5).json()
        return st if st["serving_version"] == version and not st["loading"] else None

    return wait_for(check, timeout, 0.05, f"{url} serving v{version}")  # type: ignore[no-any-return]


def wait_stage_failed(url: str, timeout: float = SWAP_S) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = httpx.get(url + "/status", timeout=5).json()
        return st if st["staged"] and st["staged"]["state"] == "failed" else None

    return wait_for(check, timeout, 0.05, f"{url}: the staged model reported failed")  # type: ignore[no-any-return]


def generate(url: str, prompt: str, n: int = MAX_NEW, **extra: Any) -> httpx.Response:
    return httpx.post(
        url + "/generate",
        json={"prompt": prompt, "max_new_tokens": n, "temperature": 0, **extra},
        timeout=120,
    )


@contextmanager
def replica_process(builtin_dir: Path, log_dir: Path, **env: str) -> Iterator[Proc]:
    """``python -m lockstep serve`` with the session's built-in models, no shared folder; ready on yield."""
    port = free_port()
    env = {"LOCKSTEP_DTYPE": "float32", **env}  # as replica_settings: the references are float32
    proc = spawn("replica", ["serve", "--port", str(port)], base_env(builtin_dir, **env), log_dir, port)
    try:
        wait_for(lambda: proc.ready() or not proc.alive(), BOOT_S, 0.1, "the replica ready")
        assert proc.alive(), f"the replica exited:\n{proc.log()[-3000:]}"
        yield proc
    finally:
        if proc.alive():
            proc.process.terminate()
            try:
                proc.process.wait(timeout=20)
            except Exception:
                proc.kill()


@pytest.fixture(scope="session")
def expected(tiny_dirs: dict[int, Path]) -> dict[int, dict[str, str]]:
    """Seed → prompt → the greedy answer of that built-in tiny model (MAX_NEW tokens)."""
    return {seed: {p: reference_text(d, p) for p in PROMPTS} for seed, d in tiny_dirs.items()}
