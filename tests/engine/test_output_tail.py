"""OutputTail: what child processes write while an engine starts reaches the logs unchanged, and its cause is kept."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lockstep.engine.vllm.output_tail import OutputTail

CHILD = """
import sys, time
print("(EngineCore pid=7) INFO 12-05 14:47:18 [core.py:1] loading weights", flush=True)
print("(EngineCore pid=7) ERROR 12-05 14:47:18 [core.py:2] ValueError: 7.63 GiB KV cache is needed, which is larger "
      "than the available KV cache memory (0.25 GiB)", flush=True)
sys.stderr.write("Traceback (most recent call last):\\n  File \\"core.py\\", line 3, in run\\n    raise ValueError(\\n")
sys.stderr.write("ValueError: 7.63 GiB KV cache is needed, which is larger than the available KV cache memory "
                 "(0.25 GiB)\\n")
sys.stderr.write("RuntimeError: Engine core initialization failed. See root cause above.\\n")
"""


def test_a_childs_cause_is_kept_and_everything_it_wrote_still_reaches_the_logs(
        capfd: pytest.CaptureFixture[str]) -> None:
    with OutputTail() as tail:
        subprocess.run([sys.executable, "-c", CHILD], check=True)  # inherits fds 1 and 2, as vLLM's engine does
        print("the parent's own line", flush=True)
    print("after the start", flush=True)
    assert tail.cause() == ("ValueError: 7.63 GiB KV cache is needed, which is larger than the available KV cache "
                            "memory (0.25 GiB)")  # once, without the log prefix, and not "see root cause above"
    out = err = ""
    for _ in range(200):  # the copier threads hand the last bytes on
        more_out, more_err = capfd.readouterr()
        out, err = out + more_out, err + more_err
        if "loading weights" in out and "initialization failed" in err:
            break
        time.sleep(0.01)
    assert "loading weights" in out and "the parent's own line" in out and "after the start" in out
    assert "Traceback" in err and "initialization failed" in err


def test_without_a_cause_there_is_none() -> None:
    with OutputTail() as tail:
        subprocess.run([sys.executable, "-c", "print('all well')"], check=True)
    assert tail.cause() is None
