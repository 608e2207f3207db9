"""OutputTail: what child processes write while an engine starts reaches the logs unchanged, and its cause is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lockstep.engine.vllm.output_tail import OutputTail
from tests.support.cluster import wait_for

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


def test_a_childs_cause_is_kept_and_everything_it_wrote_still_reaches_the_logs(tmp_path: Path) -> None:
    """Where fds 1 and 2 pointed before the start (files of this test's own: pytest's capture of them is itself
    a redirection) receives everything, the child's lines and the parent's, before and after."""
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    _flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            with OutputTail() as tail:
                subprocess.run([sys.executable, "-c", CHILD], check=True)  # inherits fds 1 and 2, as vLLM's does
                os.write(1, b"the parent's own line\n")
            os.write(1, b"after the start\n")
    finally:
        for fd, original in saved.items():
            os.dup2(original, fd)
            os.close(original)
    assert tail.cause() == ("ValueError: 7.63 GiB KV cache is needed, which is larger than the available KV cache "
                            "memory (0.25 GiB)")  # once, without the log prefix, and not "see root cause above"

    def written() -> tuple[str, str] | None:  # the copier threads hand the last bytes on
        got = out_path.read_text(), err_path.read_text()
        done = all(line in got[0] for line in ("loading weights", "the parent's own line", "after the start"))
        return got if done and "initialization failed" in got[1] else None

    out_text, err_text = wait_for(written, 30, 0.01, "the copier threads to pass everything on")
    assert out_text.index("loading weights") < out_text.index("the parent's own line")  # unchanged, in order
    assert "Traceback" in err_text


def _flush() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


def test_without_a_cause_there_is_none() -> None:
    with OutputTail() as tail:
        subprocess.run([sys.executable, "-c", "print('all well')"], check=True)
    assert tail.cause() is None
