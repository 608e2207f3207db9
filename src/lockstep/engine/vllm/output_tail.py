"""What vLLM's engine processes wrote while they started, so that a start that fails can say why.

vLLM starts its engine core in a child process, and that one its workers. When a start fails (a KV cache the
memory cannot hold, weights that do not fit the architecture...), a child logs the cause (vLLM's logger writes
to stdout, tracebacks go to stderr) and the parent raises only "Engine core initialization failed. See root
cause above". While an engine starts, ``OutputTail`` points this process's file descriptors 1 and 2, which the
children inherit, at pipes: a thread per pipe copies everything on to where it went before (nothing is lost for
whoever reads the logs) and keeps the last lines. The children keep the pipes for their whole life; a thread
ends when the last writer of its pipe closes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections import deque
from types import TracebackType

KEEP_LINES = 400  # of what the children (and, during the start, this process) wrote
MAX_LINE_CHARS = 500
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A line that names a cause: an exception with its message, or vLLM's words for memory it lacks.
_CAUSE = re.compile(r"\b[A-Z]\w*(Error|Exception)\b: \S|is larger than the available|out of memory|"
                    r"not enough memory|insufficient memory", re.IGNORECASE)
# vLLM's log prefix, "(EngineCore pid=7) ERROR 12-05 14:47:18 [core.py:1510] ": the same cause is also in the
# traceback, without it.
_PREFIX = re.compile(r"^(\(\w+ pid=\d+\)\s*)?([A-Z]+ \d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \[[^\]]*\]\s*)?")
# Lines that only point elsewhere ("see root cause above"), or code quoted in a traceback.
_POINTERS = re.compile(r"see (the )?(root cause|stack trace)|^\s*(File |raise |\^)", re.IGNORECASE)


class OutputTail:
    """``with OutputTail() as tail:`` around a vLLM engine start; ``tail.cause()`` after it failed."""

    def __init__(self, keep: int = KEEP_LINES, fds: tuple[int, ...] = (1, 2)) -> None:
        self._lines: deque[str] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._fds = fds
        self._saved: dict[int, int] = {}

    def __enter__(self) -> OutputTail:
        _flush()
        for fd in self._fds:
            read_end, write_end = os.pipe()
            self._saved[fd] = os.dup(fd)
            out = os.dup(self._saved[fd])  # the copier's own: it outlives the restore below
            os.dup2(write_end, fd)
            os.close(write_end)
            threading.Thread(target=self._copy, args=(read_end, out), name=f"vllm-output-{fd}", daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        _flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # this process writes where it did again; the children keep the pipes
            os.close(saved)
        self._saved.clear()

    def _copy(self, read_end: int, out: int) -> None:
        pending = b""
        try:
            while chunk := os.read(read_end, 65536):
                with contextlib.suppress(OSError):
                    os.write(out, chunk)
                *whole, pending = (pending + chunk).split(b"\n")
                pending = pending[-MAX_LINE_CHARS * 4:]
                with self._lock:
                    self._lines.extend(_clean(line) for line in whole)
        finally:
            os.close(read_end)
            os.close(out)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def cause(self, limit: int = 2) -> str | None:
        """The last few lines that say what went wrong (not where to look), joined; None when none does."""
        said = [_PREFIX.sub("", line) for line in self.lines() if _CAUSE.search(line) and not _POINTERS.search(line)]
        return " | ".join(list(dict.fromkeys(said))[-limit:]) or None


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _clean(raw: bytes) -> str:
    text = _ANSI.sub("", raw.decode("utf-8", "replace")).strip()
    return text[:MAX_LINE_CHARS]
