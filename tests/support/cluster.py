"""Real processes for end-to-end tests: replicas (``python -m lockstep serve``) sharing a temporary folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; raise with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # servers still starting
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})"
                                                                             if last_exc else ""))


def metric(proc: Proc, name: str) -> float:
    """The sum of every series of metric ``name`` on the replica's /metrics."""
    total = 0.0
    for line in proc.get("/metrics").text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def gauges(replica: Proc) -> tuple[float, float]:
    """``lockstep_serving_version`` and ``lockstep_committed_version`` on the replica's /metrics."""
    return metric(replica, "lockstep_serving_version"), metric(replica, "lockstep_committed_version")


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` under uvicorn on a free loopback port, in a thread of this process; its URL while in use."""
    import threading

    import uvicorn

    from lockstep.core.http_server import server_config

    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, 0.02, "the server started")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def base_env(builtin_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for child processes: the session's prebuilt built-in models, fast polling, offline hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCKSTEP_", "INFERENCE_URLS", "SYNC_STATE"))}
    env.update({"LOCKSTEP_BUILTIN_DIR": str(builtin_dir), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "LOCKSTEP_POLL_INTERVAL_S": "0.05", "LOCKSTEP_HEARTBEAT_INTERVAL_S": "0.2",
                "LOCKSTEP_HEARTBEAT_TTL_S": "3", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "LOCKSTEP_ENGINE": "builtin",
                # The oracle's references are float32 (auto picks bfloat16 on CPUs with AMX/AVX512-BF16, where
                # batching changes close logits).
                "LOCKSTEP_DTYPE": "float32"})
    env.update(extra)
    return env


@dataclass
class Proc:
    """One ``lockstep`` child process and where it answers."""

    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kw.pop("timeout", 10), **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def ready(self) -> bool:
        try:
            return self.get("/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def status(self) -> dict[str, Any]:
        return self.get("/status").json()  # type: ignore[no-any-return]


def spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path, port: int) -> Proc:
    """Start ``python -m lockstep ARGS`` with its output in ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    out = open(log_path, "ab")
    process = subprocess.Popen([sys.executable, "-m", "lockstep", *args], env=env, stdout=out,
                               stderr=subprocess.STDOUT, cwd=REPO)
    out.close()
    return Proc(name, f"http://127.0.0.1:{port}", port, process, log_path)


@dataclass
class LocalCluster:
    """N replicas sharing one folder, as on a Kubernetes PVC."""

    root: Path
    builtin_dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    replicas: list[Proc] = field(default_factory=list)
    others: list[Proc] = field(default_factory=list)

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(self.builtin_dir, LOCKSTEP_SHARED_DIR=str(self.shared), **{**self.env_extra, **extra})

    def add_replica(self, name: str | None = None, wait: bool = True, **env: str) -> Proc:
        port = free_port()
        name = name or f"replica-{len(self.replicas) + 1}"
        env = {"LOCKSTEP_VERSIONS_DIR": str(self.root / "versions-cache" / name), **env}
        proc = spawn(name, ["serve", "--port", str(port)], self.env(LOCKSTEP_REPLICA_ID=name, **env),
                     self.root / "logs", port)
        self.replicas.append(proc)
        if wait:
            wait_for(proc.ready, 120, 0.1, f"{name} ready (log: {proc.log()[-2000:]})")
        return proc

    def run_cli(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lockstep", *args], env=self.env(**env), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def publish(self, ref: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run_cli("publish", ref, *extra)

    def wait_all_serving(self, version: int, timeout: float = 60) -> None:
        """Every live replica ready on ``version``, and saying so on /metrics (what the alerts read)."""
        def check() -> bool:
            live = [r for r in self.replicas if r.alive()]
            return all(r.status()["serving_version"] == version and r.ready() and gauges(r) == (version, version)
                       for r in live)

        wait_for(check, timeout, 0.05, f"every replica serving v{version}")

    def stop(self) -> None:
        for proc in self.replicas + self.others:
            if proc.alive():
                proc.process.terminate()
        for proc in self.replicas + self.others:
            try:
                proc.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def http_replicas(builtin_dir: Path, logs: Path, count: int = 2, **env: str) -> Iterator[list[Proc]]:
    """``count`` replicas ``r0``, ``r1``… with no shared folder (a coordinator drives them over HTTP), ready."""
    procs = []
    try:
        for i in range(count):
            port = free_port()
            procs.append(spawn(f"r{i}", ["serve", "--port", str(port)],
                               base_env(builtin_dir, LOCKSTEP_REPLICA_ID=f"r{i}", **env), logs, port))
        for p in procs:
            wait_for(p.ready, 120, 0.1, f"{p.name} ready ({p.log()[-1000:]})")
        yield procs
    finally:
        for p in procs:
            p.kill()


@contextmanager
def local_cluster(root: Path, builtin_dir: Path, replicas: int = 2, **env: str) -> Iterator[LocalCluster]:
    """Start ``replicas`` replicas, yield the cluster, stop everything."""
    cluster = LocalCluster(root, builtin_dir, dict(env))
    cluster.shared.mkdir(parents=True, exist_ok=True)
    try:
        for _ in range(replicas):
            cluster.add_replica(wait=False)
        for proc in cluster.replicas:
            wait_for(proc.ready, 120, 0.1, f"{proc.name} ready (log: {proc.log()[-2000:]})")
        yield cluster
    finally:
        cluster.stop()
