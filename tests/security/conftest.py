"""What the adversarial tests share: the token, servers on 127.0.0.1 in this process, the UI login, and small
model folders that are cheap to publish."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from lockstep.core.http_server import server_config
from lockstep.core.settings import Settings
from tests.support.cluster import free_port, wait_for

# Long and random-looking: servers refuse placeholder or short tokens.
TOKEN = "adversarial-suite-0f3c9a7e5b2d41c8a6e0"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOOT_S = 120.0  # bounds of waits on a shared, loaded 2-core machine (a hang, not a speed check)


def settings(**overrides: Any) -> Settings:
    """Settings for a server of this suite: offline, CPU, the token, any Host (tests reach it by IP)."""
    base: dict[str, Any] = {"hf_hub_offline": True, "device": "cpu", "api_token": TOKEN, "allowed_hosts": "*",
                            "sync_state_file": None, "hf_home": None}
    return Settings(**{**base, **overrides})


def replica_settings(builtin_dir: Path, **overrides: Any) -> Settings:
    """A replica without a shared folder serving builtin:tiny, small generation limits (fast fuzzing)."""
    return settings(**{"builtin_dir": builtin_dir, "shared_dir": None, "replica_id": "sec-replica",
                       "max_new_tokens_limit": 16, "max_prompt_chars": 2000, **overrides})


def trainer_settings(shared: Path, builtin_dir: Path, **overrides: Any) -> Settings:
    """A trainer on ``shared`` with static discovery of no replica (publishes commit at once)."""
    return settings(**{"shared_dir": shared, "builtin_dir": builtin_dir, "discovery": "static",
                       "inference_urls": "", "poll_interval_s": 0.05, "heartbeat_ttl_s": 3.0,
                       "stage_timeout_s": 5.0, "commit_margin_s": 0.1, **overrides})


@dataclass
class Server:
    """An ASGI app answering on 127.0.0.1 from a thread of this process."""

    url: str
    app: Any
    port: int

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=kw.pop("timeout", 60), **kw)


@contextmanager
def serve(app: Any, ready_path: str | None = None) -> Iterator[Server]:
    """Run ``app`` under uvicorn in a thread (lifespan on); stop it on exit. Torch uses one thread meanwhile,
    as child replicas do: OpenMP spin-waits make a tiny model many times slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-sec-{port}", daemon=True)
    thread.start()
    srv = Server(f"http://127.0.0.1:{port}", app, port)
    try:
        wait_for(lambda: server.started, 60, 0.02, "uvicorn started")
        if ready_path is not None:
            wait_for(lambda: httpx.get(srv.url + ready_path, timeout=5).status_code == 200, BOOT_S, 0.05,
                     f"{srv.url}{ready_path} 200")
        yield srv
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        torch.set_num_threads(threads)


def ui_login(client: httpx.Client | Any, token: str = TOKEN) -> dict[str, str]:
    """Log in to a UI when it has ``POST /api/login``; returns the headers every change must then carry
    (the CSRF header), or {} for a UI without a login."""
    paths = client.get("/openapi.json").json().get("paths", {})
    if "/api/login" not in paths:
        return {}
    response = client.post("/api/login", json={"token": token})
    assert response.status_code == 200, f"login with the right token failed: {response.status_code} {response.text}"
    return csrf_headers(response.json())


def csrf_headers(body: dict[str, Any]) -> dict[str, str]:
    """The CSRF header of a login answer (the header name the UI's session module names)."""
    try:
        from lockstep.ui.session import CSRF_HEADER  # type: ignore[attr-defined]
    except ImportError:  # no session module: a UI without a login
        CSRF_HEADER = "X-Lockstep-CSRF"  # noqa: N806
    csrf = body.get("csrf")
    return {CSRF_HEADER: csrf} if isinstance(csrf, str) and csrf else {}


def small_model_dir(dest: Path, seed: int) -> Path:
    """A folder the store accepts as a model (config.json + safetensors weights), a few hundred bytes; its
    content, so its digest, depends on ``seed``. Never loaded: for publishes to a cluster of no replica."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps({"model_type": "llama", "lockstep_test_seed": seed}))
    save_file({"w": torch.full((4,), float(seed))}, str(dest / "model.safetensors"))
    return dest


def raw_http(port: int, head: bytes, body_chunks: Iterator[bytes] | None = None, *, read_timeout: float = 30.0,
             ) -> tuple[bytes, int]:
    """Send a raw request to 127.0.0.1:``port``; stop sending as soon as the server answers or closes.

    Returns (the first bytes of the response, how many body bytes were sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head)
        if body_chunks is not None:
            sock.setblocking(False)
            import select

            for chunk in body_chunks:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                view = memoryview(chunk)
                while view:
                    _, writable, _ = select.select([], [sock], [], read_timeout)
                    if not writable:
                        break
                    try:
                        n = sock.send(view)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:  # reset or broken pipe: the server closed it
                        view = memoryview(b"")
                        body_chunks = None
                        break
                    sent += n
                    view = view[n:]
                if body_chunks is None:
                    break
            sock.setblocking(True)
            sock.settimeout(read_timeout)
        try:
            data = sock.recv(4096)
        except (TimeoutError, OSError):
            data = b""
    return data, sent


@pytest.fixture(scope="session")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """60 distinct small model folders."""
    root = tmp_path_factory.mktemp("small-models")
    return [small_model_dir(root / f"m{i:02d}", i) for i in range(60)]
