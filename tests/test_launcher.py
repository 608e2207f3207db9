"""``lockstep up``: every process starts on loopback and every one stops, on Ctrl-C and on a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lockstep.core.guards import MIN_TOKEN_CHARS, check_exposure
from lockstep.launcher import local_token
from tests.support.cluster import base_env, free_port, wait_for

BOOT_S = 180.0  # seconds until every process answers (a hang, not a speed check)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.e2e
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_starts_every_process_and_one_signal_stops_them_all(builtin_dir: Path, tmp_path: Path,
                                                               stop_signal: signal.Signals) -> None:
    ports = {"base": free_port(), "trainer": free_port(), "ui": free_port()}
    second = ports["base"] + 1
    cmd = [sys.executable, "-m", "lockstep", "up", "--replicas", "2", "--shared", str(tmp_path / "shared"),
           "--base-port", str(ports["base"]), "--trainer-port", str(ports["trainer"]), "--ui-port", str(ports["ui"])]
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(cmd, env=base_env(builtin_dir), stdout=log, stderr=subprocess.STDOUT)
    try:
        urls = [f"http://127.0.0.1:{ports['base']}/ready", f"http://127.0.0.1:{second}/ready",
                f"http://127.0.0.1:{ports['trainer']}/healthz", f"http://127.0.0.1:{ports['ui']}/healthz"]

        def all_answer() -> bool:
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            try:
                return all(httpx.get(u, timeout=2).status_code == 200 for u in urls)
            except httpx.HTTPError:
                return False

        wait_for(all_answer, BOOT_S, 0.5, "every process of `lockstep up` answering")
        check_the_token_guards_every_door(tmp_path / "shared" / "api-token", ports)
        children = _children(up.pid)
        assert len(children) == 4, children  # two replicas, the trainer, the UI
        up.send_signal(stop_signal)
        assert up.wait(timeout=60) == 0
        assert [c for c in children if _alive(c)] == []
        for url in urls:
            with pytest.raises(httpx.ConnectError):
                httpx.get(url, timeout=2)
    finally:
        if up.poll() is None:  # a failed check: SIGTERM lets `up` stop its children (own sessions); SIGKILL would not
            up.terminate()
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
        log.close()


def check_the_token_guards_every_door(token_file: Path, ports: dict[str, int]) -> None:
    """`up` made a private random token; the trainer and the UI want it, and the UI only answers its own name."""
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    trainer, ui = f"http://127.0.0.1:{ports['trainer']}", f"http://127.0.0.1:{ports['ui']}"
    assert httpx.post(trainer + "/rollback", json={}, timeout=10).status_code == 401
    assert httpx.get(ui + "/api/cluster", timeout=10).status_code == 401
    assert httpx.get(ui + "/api/config", headers={"Host": "evil.example"}, timeout=10).status_code == 400
    with httpx.Client(base_url=ui, timeout=10) as browser:
        assert browser.post("/api/login", json={"token": token + "x"}).status_code == 401
        assert browser.post("/api/login", json={"token": token}).status_code == 200
        assert browser.get("/api/cluster").status_code == 200


# --------------------------------------------------------------------------------------------- the token
def test_up_makes_a_random_private_token_once(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    token = local_token(path)
    assert len(token) == 64 and int(token, 16) >= 0, "64 hex digits from secrets"
    assert path.stat().st_mode & 0o777 == 0o600, "only the operator may read it"
    assert path.read_text() == token + "\n"
    assert local_token(path) == token, "kept across restarts: open pages and the CLI keep working"
    assert local_token(tmp_path / "other") != token
    check_exposure("127.0.0.1", token, allow_unauthenticated=False, server="up")  # long enough, no placeholder
    assert len(token) >= MIN_TOKEN_CHARS


@pytest.mark.parametrize("content", ["", "short\n", "replace-me\n"])
def test_a_missing_or_weak_token_file_is_replaced(tmp_path: Path, content: str) -> None:
    path = tmp_path / "api-token"
    path.write_text(content)
    path.chmod(0o644)
    token = local_token(path)
    assert len(token) == 64 and token not in content
    assert path.stat().st_mode & 0o777 == 0o600, "a rewritten file is private again"


def test_up_refuses_a_port_another_process_listens_on_before_starting_anything(tmp_path: Path) -> None:
    """A replica that cannot bind exits, but whatever holds its port answers the readiness probe in its place:
    `up` announced a fleet that was not its own. It must refuse at once, naming the port and how to move."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "lockstep", "up", "--replicas", "1", "--base-port", str(port),
                               "--no-trainer", "--no-ui", "--shared", str(tmp_path / "shared")],
                              capture_output=True, text=True, timeout=120, env=base_env(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"port {port} (replica-1)" in done.stderr and "--base-port" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Lockstep is up" not in done.stdout
