"""schemathesis against the OpenAPI spec of each server, with the token configured and sent (and, for the UI,
logged in when it has a login): valid and invalid requests from the spec never get a 5xx, and what comes back
conforms to the spec (body schema, content type); requests that break the spec are refused.

One replica (builtin:tiny, no shared folder), one trainer (a temporary shared folder, static discovery of that
replica) and one UI in front of both, all on 127.0.0.1 in this process. Each operation gets a bounded number
of examples in each generation mode, deterministically; every failing operation is reported with a curl line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
)

from lockstep.inference.app import create_app as replica_app
from lockstep.trainer.server.app import create_app as trainer_app
from lockstep.trainer.server.schemas import FinetuneParams, SimulationParams
from lockstep.ui.app import create_app as ui_app
from tests.security.conftest import AUTH, Server, replica_settings, serve, trainer_settings, ui_login
from tests.security.conftest import settings as base_settings
from tests.security.strategies import BOUNDED

EXAMPLES = 6  # per operation and generation mode: ~30 operations × 2 modes in all
# Server-sent event streams never end on their own; they take no body and are read by other tests.
STREAMS = {"/events", "/api/events"}
# Operations that change a server's state go last, so the reads and generations see a settled server.
MUTATING_LAST = ("/admin/", "/update-model", "/rollback", "/publish", "/runs", "/store/uploads", "/api/log")
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
DOCUMENTED_5XX = {("GET", "/ready", 503)}  # unready is what /ready is for (docs/api.md)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Iterator[dict[str, Server]]:
    root = tmp_path_factory.mktemp("fuzz")
    with serve(replica_app(replica_settings(builtin_dir)), ready_path="/ready") as replica:
        tsettings = trainer_settings(root / "shared", builtin_dir, inference_urls=replica.url,
                                     trainer_data_dir=root / "trainer-data")
        with serve(trainer_app(tsettings), ready_path="/ready") as trainer:
            usettings = base_settings(trainer_url=trainer.url, inference_service_url=replica.url,
                                      inference_urls=replica.url, builtin_dir=builtin_dir)
            with serve(ui_app(usettings), ready_path="/healthz") as ui:
                yield {"replica": replica, "trainer": trainer, "ui": ui}


def starts_a_run(case: Any) -> bool:
    """A valid run start: a training run would take the machine's CPUs for the rest of the module (starting
    runs, and refusing a second one, are tested in tests/trainer); everything else about /runs is fuzzed."""
    body = case.body if isinstance(case.body, dict) else None
    if case.method.upper() != "POST" or case.operation.path not in ("/runs", "/api/runs") or body is None:
        return False
    kinds = {"simulation": SimulationParams, "finetune": FinetuneParams}
    if body.get("kind") not in kinds:
        return False
    try:
        kinds[body["kind"]].model_validate(body.get("params") or {})
    except (ValidationError, TypeError):
        return False
    return True


def operations(schema: Any) -> list[Any]:
    ops = [r.ok() for r in schema.get_all_operations()]
    ops = [op for op in ops if op.path not in STREAMS]
    return sorted(ops, key=lambda op: (any(op.path.startswith(p) for p in MUTATING_LAST), op.method != "get",
                                       op.path, op.method))


def fuzz_operation(server: Server, session: requests.Session, op: Any, mode: GenerationMode,
                   statuses: list[tuple[str, int]]) -> list[str]:
    """Up to EXAMPLES cases of one operation in one mode; the first failure, as one line (not shrunk)."""
    seen: list[str] = []
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @settings(BOUNDED, max_examples=EXAMPLES)
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if seen or starts_a_run(case):
            return  # one failure per operation and mode is enough to report
        response = case.call(base_url=server.url, session=session, timeout=60)
        statuses.append((case.method.upper(), response.status_code))
        if (case.method.upper(), op.path, response.status_code) in DOCUMENTED_5XX:
            return
        try:
            case.validate_response(response, checks=checks)
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup: recorded, not shrunk
            lines = str(exc).strip().splitlines()
            why = "; ".join(line[2:] for line in lines if line.startswith("- ")) or repr(exc)
            seen.append(f"{op.method.upper()} {op.path} [{mode.value}] → {response.status_code}: "
                        f"{why[:200]} | {case.as_curl_command()[:400]}")

    try:
        run()
    except Unsatisfiable:  # negative mode on an operation without inputs: nothing to break
        assert mode is GenerationMode.NEGATIVE, f"{op.method} {op.path}: no valid example"
    return seen


def fuzz(server: Server, session: requests.Session) -> list[str]:
    """Every operation of ``server``'s spec, positive then negative examples; the failures, one line each."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    statuses: list[tuple[str, int]] = []
    ops = operations(schema)
    assert ops, "the spec lists no operation"
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += fuzz_operation(server, session, op, mode, statuses)
    let_in = [status for method, status in statuses if method != "GET" and status not in (401, 403)]
    assert let_in, f"every change was refused as unauthenticated: the token or the login did not work ({statuses[:20]})"
    return failures


def _session(headers: dict[str, str]) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # 127.0.0.1 only, never through a proxy from the environment
    session.headers.update(headers)
    return session


def test_replica_spec_fuzzed_with_the_token(stack: dict[str, Server]) -> None:
    with _session(AUTH) as session:
        failures = fuzz(stack["replica"], session)
    assert not failures, f"{len(failures)} replica operations failed:\n" + "\n".join(failures)


def test_trainer_spec_fuzzed_with_the_token(stack: dict[str, Server]) -> None:
    with _session(AUTH) as session:
        failures = fuzz(stack["trainer"], session)
    assert not failures, f"{len(failures)} trainer operations failed:\n" + "\n".join(failures)


def test_ui_spec_fuzzed_logged_in(stack: dict[str, Server]) -> None:
    session = _session({})
    ui = stack["ui"]

    class Client:  # ui_login's view of a requests session bound to the UI's URL
        def get(self, path: str) -> Any:
            return session.get(ui.url + path, timeout=30)

        def post(self, path: str, **kw: Any) -> Any:
            return session.post(ui.url + path, timeout=30, **kw)

    with session:
        session.headers.update(ui_login(Client()))  # the session cookie stays in the session's jar
        failures = fuzz(ui, session)
    assert not failures, f"{len(failures)} UI operations failed:\n" + "\n".join(failures)
