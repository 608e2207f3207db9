"""Shipped start-up safety, as real processes: no server listens beyond loopback without a real token, and a
loopback server answers only its own host names (DNS rebinding from a web page the operator opens)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.cluster import REPO, Proc, base_env, free_port, spawn, wait_for

from . import K8S

pytestmark = pytest.mark.e2e

SERVERS = ["serve", "trainer", "ui"]
START_TIMEOUT_S = 120  # a refusal comes before the app is built; this only bounds a server that wrongly starts


def shipped_placeholder() -> str:
    """The token k8s/secret.yaml ships with (the operator must replace it)."""
    return str(yaml.safe_load((K8S / "secret.yaml").read_text())["stringData"]["token"])


def start(server: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``lockstep SERVER --host 0.0.0.0`` as a pod starts it; returns once it exits."""
    args = [sys.executable, "-m", "lockstep", server, "--host", "0.0.0.0", "--port", str(free_port())]
    if server == "trainer":
        args += ["--shared", str(tmp_path / "shared")]
    return subprocess.run(args, env=base_env(tmp_path / "builtin", **env), cwd=REPO, capture_output=True,
                          text=True, timeout=START_TIMEOUT_S, check=False)


@pytest.mark.parametrize("server", SERVERS)
def test_no_token_on_every_interface_refuses_to_start(server: str, tmp_path: Path) -> None:
    done = start(server, tmp_path)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "LOCKSTEP_ALLOW_UNAUTHENTICATED" in done.stderr, done.stderr[-2000:]
    assert "LOCKSTEP_API_TOKEN" in done.stderr


@pytest.mark.parametrize("server", SERVERS)
def test_the_shipped_placeholder_token_refuses_to_start(server: str, tmp_path: Path) -> None:
    done = start(server, tmp_path, LOCKSTEP_API_TOKEN=shipped_placeholder())
    assert done.returncode != 0, done.stderr[-2000:]
    assert "placeholder" in done.stderr and "openssl rand" in done.stderr, done.stderr[-2000:]


def test_a_short_token_refuses_to_start(tmp_path: Path) -> None:
    done = start("ui", tmp_path, LOCKSTEP_API_TOKEN="abc123")
    assert done.returncode != 0 and "shorter than" in done.stderr, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------ DNS rebinding
@pytest.fixture(scope="module")
def loopback_servers(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Iterator[dict[str, Proc]]:
    """The trainer and the UI on 127.0.0.1 (their default), with a token, as `lockstep up` starts them."""
    root = tmp_path_factory.mktemp("rebinding")
    env = base_env(builtin_dir, LOCKSTEP_API_TOKEN="rebinding-test-token-0f9a3c71")
    trainer_port, ui_port = free_port(), free_port()
    procs = {
        "trainer": spawn("trainer", ["trainer", "--port", str(trainer_port), "--shared", str(root / "shared")], env,
                         root / "logs", trainer_port),
        "ui": spawn("ui", ["ui", "--port", str(ui_port), "--trainer-url", f"http://127.0.0.1:{trainer_port}"], env,
                    root / "logs", ui_port),
    }
    try:
        for proc in procs.values():
            wait_for(lambda p=proc: p.alive() and p.get("/healthz", timeout=2).status_code == 200, 120, 0.2,
                     f"{proc.name} answering (log: {proc.log()[-1500:]})")
        yield procs
    finally:
        for proc in procs.values():
            proc.kill()


@pytest.mark.parametrize("server", ["trainer", "ui"])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "attacker.test.", "10.0.0.1"])
def test_a_loopback_server_refuses_a_foreign_host(loopback_servers: dict[str, Proc], server: str,
                                                  host: str) -> None:
    proc = loopback_servers[server]
    for method, path in (("GET", "/openapi.json"), ("POST", "/api/login" if server == "ui" else "/publish")):
        response = httpx.request(method, proc.url + path, headers={"Host": host}, json={}, timeout=10)
        assert response.status_code == 400, (method, path, response.text)
        assert "LOCKSTEP_ALLOWED_HOSTS" in response.json()["error"]["message"]
    # Kubelet probes send the pod IP as Host: the probes answer any Host, and say nothing more than alive/ready.
    assert httpx.get(proc.url + "/healthz", headers={"Host": host}, timeout=10).status_code == 200


@pytest.mark.parametrize("server", ["trainer", "ui"])
def test_a_loopback_server_answers_its_own_names(loopback_servers: dict[str, Proc], server: str) -> None:
    proc = loopback_servers[server]
    for host in (f"127.0.0.1:{proc.port}", f"localhost:{proc.port}", "localhost"):
        assert httpx.get(proc.url + "/healthz", headers={"Host": host}, timeout=10).status_code == 200, host
