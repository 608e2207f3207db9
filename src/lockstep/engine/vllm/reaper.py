"""No orphaned vLLM processes: a watchdog that kills them when this process dies, even by SIGKILL.

vLLM runs each engine in spawned processes (``VLLM::EngineCore`` and, on CPU and for tensor parallelism,
``VLLM::Worker``) that do not watch their parent: a replica killed with SIGKILL (or OOM-killed) leaves them
running with the model and KV cache in memory. The watchdog is a small child process holding the read end of a
pipe whose write end only this process holds; it records this process's vLLM/multiprocessing descendants every
``interval`` seconds and, at EOF (this process is gone, however it died), kills what it recorded and their
children. One per process, started before the first engine so a kill during a load is covered too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

_SCRIPT = r"""
import os, sys, threading
import psutil

parent, interval, me = int(sys.argv[1]), float(sys.argv[2]), os.getpid()
gone = threading.Event()

def wait_eof():
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except Exception:
        pass
    gone.set()

threading.Thread(target=wait_eof, daemon=True).start()

def ours(p):
    try:
        return p.name().startswith("VLLM") or "multiprocessing" in " ".join(p.cmdline())
    except psutil.Error:
        return False

seen = {}
while not gone.wait(interval):
    try:
        kids = psutil.Process(parent).children(recursive=True)
    except psutil.Error:
        break
    for p in kids:
        if p.pid != me and p.pid not in seen and ours(p):
            try:
                seen[p.pid] = p.create_time()
            except psutil.Error:
                pass

victims = []
for pid, created in seen.items():
    try:
        p = psutil.Process(pid)
        if p.create_time() == created:
            victims += p.children(recursive=True) + [p]
    except psutil.Error:
        pass
for p in victims:
    try:
        p.kill()
    except psutil.Error:
        pass
"""

_lock = threading.Lock()
_watchdog: subprocess.Popen[bytes] | None = None


def ensure_reaper(interval_s: float = 0.2) -> int:
    """Start this process's watchdog once (idempotent); returns its pid."""
    global _watchdog
    with _lock:
        if _watchdog is None or _watchdog.poll() is not None:
            _watchdog = subprocess.Popen(
                [sys.executable, "-c", _SCRIPT, str(os.getpid()), str(interval_s)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
            )
        return _watchdog.pid
