"""The command line refuses bad settings with what is allowed, in one line each and no traceback."""

from __future__ import annotations

import pytest

from lockstep import cli


@pytest.mark.parametrize(("env", "says"), [
    ({"LOCKSTEP_ENGINE": "bogus"}, "LOCKSTEP_ENGINE='bogus': Input should be 'auto', 'vllm' or 'builtin'"),
    ({"LOCKSTEP_VLLM_ARGS": "[1"}, "LOCKSTEP_VLLM_ARGS='[1'"),
    ({"LOCKSTEP_POLL_INTERVAL_S": "soon"}, "LOCKSTEP_POLL_INTERVAL_S='soon'"),
])
def test_a_setting_that_does_not_fit_is_one_line_naming_it(env: dict[str, str], says: str,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and err.startswith("error: ")
