"""The command line refuses bad settings with what is allowed, in one line each and no traceback."""

from __future__ import annotations

import pytest

from lockstep import cli


@pytest.mark.parametrize(("env", "says"), [
    ({"LOCKSTEP_ENGINE": "bogus"}, "LOCKSTEP_ENGINE='bogus': Input should be 'auto', 'vllm' or 'builtin'"),
    ({"LOCKSTEP_VLLM_ARGS": "[1"}, "LOCKSTEP_VLLM_ARGS='[1'"),
    ({"LOCKSTEP_POLL_INTERVAL_S": "soon"}, "LOCKSTEP_POLL_INTERVAL_S='soon'"),
    ({"LOCKSTEP_REPLICA_ID": "r\udce8"}, "not valid UTF-8"),  # the byte 0xE8 alone, as the environment gives it
])
def test_a_setting_that_does_not_fit_is_one_line_naming_it(env: dict[str, str], says: str,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and err.startswith("error: ")


@pytest.mark.parametrize(("argv", "env", "says"), [
    (["status"], {}, "lockstep status reads the cluster's state, which the trainer keeps (--trainer URL)"),
    (["rollback"], {}, "lockstep rollback needs to reach the fleet: --shared DIR (or LOCKSTEP_SHARED_DIR) or "
                       "--trainer URL"),
    (["publish", "builtin:tiny-s1"], {}, "or the replicas' URLs (--urls, or INFERENCE_URLS)"),
    (["status", "--shared", "/nonexistent/typo"], {}, "the shared folder /nonexistent/typo does not exist"),
    # Replicas driven over HTTP keep no state: before, status printed "committed: none", then failed.
    (["status"], {"INFERENCE_URLS": "http://127.0.0.1:9"}, "replicas driven over HTTP keep none of it"),
    (["rollout", "status"], {"INFERENCE_URLS": "http://127.0.0.1:9"}, "replicas driven over HTTP keep none of it"),
])
def test_a_command_that_cannot_reach_the_fleet_says_how_to(argv: list[str], env: dict[str, str], says: str,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("LOCKSTEP_SHARED_DIR", "INFERENCE_URLS", "SYNC_STATE_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    if argv[0] != "publish":
        assert "--urls" not in err  # only publish takes it


@pytest.mark.parametrize("timeout", ["-5", "0", "nan", "soon"])
def test_a_publish_timeout_of_no_positive_seconds_is_refused(timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["publish", "builtin:tiny-s1", "--shared", "/tmp", "--timeout", timeout])
    assert exited.value.code == 2
    assert "--timeout" in capsys.readouterr().err


@pytest.mark.parametrize(("phase", "shown"), [("commit", False), ("abort", False), ("prepare", True),
                                               ("canary", True)])
def test_status_through_the_trainer_shows_only_what_is_under_way(phase: str, shown: bool,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The ledger keeps its last decision as the pending record: a finished publish is not 'pending'."""
    cli._print_cluster({"committed": {"version": 3, "model": "versions/000003"}, "generation": 7,
                        "pending": {"version": 3, "model": "versions/000003", "phase": phase},
                        "convergence": {"at_version": 2, "total": 2}, "replicas": []})
    out = capsys.readouterr().out
    assert ("in progress: v3" in out) is shown and "pending" not in out


@pytest.mark.parametrize(("status", "says"), [
    ({"coordinator_url": "http://trainer:8080"}, "follows the trainer at http://trainer:8080, which would undo"),
    ({"shared_dir": "/shared"}, "follows the shared folder /shared, which would undo"),
])
def test_a_publish_over_the_heads_of_replicas_that_follow_a_coordinator_is_refused(
        status: dict[str, str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before, `publish --urls` gave such a fleet a version number the trainer had used for another model,
    reported success, and the trainer's catch-up undid it a second later."""
    import http.server
    import json
    import threading

    class Replica(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the handler's name)
            body = json.dumps({"replica_id": "r", "state": "serving", "ready": True, **status}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replica)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert cli.main(["publish", "builtin:tiny-s1", "--urls", url]) == 2
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
