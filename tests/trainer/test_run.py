"""A run's lifecycle moves only along allowed edges, in one place."""

from __future__ import annotations

import pytest

from lockstep.core.errors import Conflict
from lockstep.trainer.runs.record import RunRecord, RunStatus


def record() -> RunRecord:
    return RunRecord(id="r1", kind="finetune", params={}, created_at=100.0)


def test_a_run_goes_queued_running_succeeded_with_its_times() -> None:
    run = record()
    run.move(RunStatus.RUNNING, 101.0)
    assert run.started_at == 101.0 and run.status.active and run.finished_at is None
    run.move(RunStatus.SUCCEEDED, 105.0)
    assert run.finished_at == 105.0 and not run.status.active


def test_an_interrupted_run_can_be_queued_again_and_loses_its_error() -> None:
    run = record()
    run.move(RunStatus.RUNNING, 101.0)
    run.move(RunStatus.INTERRUPTED, 102.0, error="trainer went away")
    assert run.error == "trainer went away"
    run.move(RunStatus.QUEUED, 110.0)
    assert run.error is None and run.finished_at is None and run.started_at == 101.0


@pytest.mark.parametrize(("first", "then"), [
    (RunStatus.SUCCEEDED, RunStatus.RUNNING), (RunStatus.FAILED, RunStatus.QUEUED),
    (RunStatus.QUEUED, RunStatus.SUCCEEDED), (RunStatus.INTERRUPTED, RunStatus.RUNNING),
])
def test_forbidden_moves_are_refused(first: RunStatus, then: RunStatus) -> None:
    run = record()
    if first is not RunStatus.QUEUED:
        run.move(RunStatus.RUNNING, 101.0)
        run.move(first, 102.0)
    with pytest.raises(Conflict, match=f"cannot become {then.value}"):
        run.move(then, 103.0)


def test_progress_has_a_bounded_fraction() -> None:
    run = record()
    run.set_progress(3, 12, "step 3/12", 101.0)
    assert run.progress.fraction == 0.25 and run.progress.message == "step 3/12"
    run.set_progress(5, 0, "starting", 102.0)
    assert run.progress.fraction == 0.0
