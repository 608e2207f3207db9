"""``lockstep up``: the whole system on loopback, a local folder standing in for the shared volume."""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lockstep.core.errors import Conflict

log = logging.getLogger(__name__)


@dataclass
class Child:
    """One process this launcher started."""

    name: str
    url: str
    probe: str
    process: subprocess.Popen[bytes]


def _spawn(name: str, args: list[str], env: dict[str, str], url: str, probe: str) -> Child:
    cmd = [sys.executable, "-m", "lockstep", *args]
    log.info("starting %s: %s", name, " ".join(cmd[2:]))
    # start_new_session: Ctrl-C reaches the launcher only, which then stops each child in order.
    process = subprocess.Popen(cmd, env=env, start_new_session=True)
    return Child(name, url, probe, process)


def _wait_ready(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(children)
    with httpx.Client(timeout=2.0) as client:
        while pending and time.monotonic() < deadline:
            for child in list(pending):
                if child.process.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with code {child.process.returncode}; see its log above")
                try:
                    if client.get(child.url + child.probe).status_code == 200:
                        log.info("%s ready at %s", child.name, child.url)
                        pending.remove(child)
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
    if pending:
        raise RuntimeError(f"not ready after {timeout_s:.0f}s: {', '.join(c.name for c in pending)}")


def stop_all(children: list[Child], grace_s: float = 10.0) -> None:
    """SIGTERM every child (replicas drain), then SIGKILL what is left after ``grace_s``."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def local_token(path: Path) -> str:
    """The local cluster's API token: read from ``path``, or made once (random, mode 0600) and kept there."""
    try:
        token = path.read_text().strip()
        if len(token) >= 32:
            return token
    except OSError:
        pass
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies only to a new file; an old one may be world-readable
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def check_ports_free(ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """``Conflict`` naming the first port already taken: a child that cannot bind exits, but another
    process on its port would answer the readiness probe in its place (and be announced as up)."""
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise Conflict(f"port {port} ({name}) on {host} is taken: {exc.strerror}. Stop what holds it, or "
                               "pass other ports (--base-port, --trainer-port, --ui-port)") from None


def run_local_cluster(*, replicas: int, shared: Path, base_port: int, trainer_port: int, ui_port: int,
                      model: str | None, with_trainer: bool, with_ui: bool) -> int:
    """Start N replicas (+ trainer and UI when present) sharing ``shared``; block until Ctrl-C."""
    ports = {f"replica-{i + 1}": base_port + i for i in range(replicas)}
    with_trainer = with_trainer and importlib.util.find_spec("lockstep.trainer.server.app") is not None
    with_ui = with_ui and importlib.util.find_spec("lockstep.ui.app") is not None
    ports.update({"trainer": trainer_port} if with_trainer else {})
    ports.update({"ui": ui_port} if with_ui else {})
    check_ports_free(ports)
    # The children run in their own sessions (so a terminal's Ctrl-C reaches only this process): a kill,
    # a closed terminal or a service manager's stop must end them too, not leave them holding the ports.
    # SIGINT too: a process started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler of its own.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    shared = shared.resolve()
    shared.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["LOCKSTEP_SHARED_DIR"] = str(shared)
    if not env.get("LOCKSTEP_API_TOKEN"):
        env["LOCKSTEP_API_TOKEN"] = local_token(shared / "api-token")
    if model:
        env["INITIAL_MODEL_REPO_ID"] = model
    urls = [f"http://127.0.0.1:{base_port + i}" for i in range(replicas)]
    env["INFERENCE_URLS"] = ",".join(urls)
    children: list[Child] = []
    try:
        for i, url in enumerate(urls):
            replica_env = {"LOCKSTEP_VERSIONS_DIR": str(shared.parent / "versions-cache" / f"replica-{i + 1}"), **env,
                           "LOCKSTEP_REPLICA_ID": f"replica-{i + 1}"}  # each replica its own copies, beside the folder
            children.append(_spawn(f"replica-{i + 1}", ["serve", "--port", str(base_port + i)], replica_env, url,
                                   "/ready"))
        trainer_url = f"http://127.0.0.1:{trainer_port}"
        if with_trainer:
            children.append(_spawn("trainer", ["trainer", "--port", str(trainer_port)], env, trainer_url,
                                   "/healthz"))
        if with_ui:
            ui_env = {**env, "TRAINER_URL": trainer_url}  # no service URL: the UI round-robins over ready replicas
            children.append(_spawn("ui", ["ui", "--port", str(ui_port)], ui_env, f"http://127.0.0.1:{ui_port}",
                                   "/healthz"))
        _wait_ready(children, timeout_s=600)
        print("\nLockstep is up (Ctrl-C stops everything):", flush=True)
        for child in children:
            print(f"  {child.name:<10} {child.url}", flush=True)
        print(f"  shared     {shared}", flush=True)
        print(f"  token      LOCKSTEP_API_TOKEN in {shared / 'api-token'} (the UI's login; "
              f"`export LOCKSTEP_API_TOKEN=$(cat {shared / 'api-token'})` for the CLI)\n", flush=True)
        while all(c.process.poll() is None for c in children):
            time.sleep(0.5)
        dead = [c.name for c in children if c.process.poll() is not None]
        log.error("%s exited; stopping the rest", ", ".join(dead))
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        stop_all(children)
