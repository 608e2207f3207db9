"""The load checker's own rules: a flip-flop is caught, a rollback or a drained old request is not one."""

from tests.support.load import Answer, Commit, check_no_flip_flop

HISTORY = [Commit(4, 0.0), Commit(5, 10.0), Commit(4, 20.0)]  # publish v5, then roll back to v4


def _answer(version: int, sent: float, received: float) -> Answer:
    return Answer("replica-1", "p", sent, received, 200, version, version, "text")


def test_a_rollback_is_moving_forward() -> None:
    answers = [_answer(4, 1, 2), _answer(5, 11, 12), _answer(4, 21, 22), _answer(4, 23, 24)]
    assert check_no_flip_flop(answers, HISTORY) == []


def test_an_old_request_that_drains_after_the_flip_is_not_a_rollback() -> None:
    # sent on v4 before the flip, finished after a v5 answer: the next v5 answers are not going back
    answers = [_answer(4, 9.9, 11.5), _answer(5, 10.5, 11.0), _answer(5, 12, 13), _answer(5, 14, 15)]
    assert check_no_flip_flop(answers, HISTORY) == []


def test_serving_the_previous_commit_again_is_a_flip_flop() -> None:
    answers = [_answer(4, 1, 2), _answer(5, 11, 12), _answer(4, 21, 22), _answer(5, 23, 24)]
    problems = check_no_flip_flop(answers, HISTORY)
    assert len(problems) == 1 and "answered v5 at 23.000 after it had served v4" in problems[0]


def test_going_back_before_any_rollback_is_a_flip_flop() -> None:
    answers = [_answer(5, 11, 12), _answer(4, 13, 14)]
    assert len(check_no_flip_flop(answers, HISTORY)) == 1
