"""Runs on the shared volume: run.json replaced atomically, .jsonl streams that survive a torn last line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockstep.core.errors import BadRequest, NotFound
from lockstep.trainer.runs.record import RunRecord, RunStatus
from lockstep.trainer.runs.store import RunStore


def test_records_round_trip_and_are_listed_oldest_first(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for i, rid in enumerate(["b-run", "a-run"]):
        record = RunRecord(id=rid, kind="simulation", params={"rounds": i}, created_at=10.0 + i)
        store.files(rid).write(record)
    assert [r.id for r in store.load_all()] == ["b-run", "a-run"]
    assert store.get("a-run").params == {"rounds": 1}
    assert not [p for p in (tmp_path / "a-run").iterdir() if p.name.endswith(".tmp")]


def test_a_torn_last_line_is_skipped_and_growth_is_seen(tmp_path: Path) -> None:
    files = RunStore(tmp_path).files("r1")
    files.append_metric({"type": "step", "step": 1})
    files.append_metric({"type": "step", "step": 2})
    with open(files.metrics_path, "ab") as f:
        f.write(b'{"type": "step", "st')  # a crash in the middle of a write
    assert [m["step"] for m in files.metrics()] == [1, 2]
    with open(files.metrics_path, "ab") as f:
        f.write(b'\n{"type": "step", "step": 3}\n')
    assert [m["step"] for m in files.metrics()] == [1, 2, 3]


def test_unreadable_runs_are_skipped_and_bad_ids_refused(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.files("good").write(RunRecord(id="good", kind="finetune", params={}, created_at=1.0,
                                        status=RunStatus.RUNNING))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "run.json").write_text("{not json")
    assert [r.id for r in store.load_all()] == ["good"]
    with pytest.raises(NotFound, match="unreadable"):
        store.get("torn")
    with pytest.raises(NotFound, match="GET /runs"):
        store.get("missing")
    for bad in ("../etc", "UPPER", "a/b", ""):
        with pytest.raises(BadRequest, match="malformed"):
            store.files(bad)
