"""Benchmark: a replica under mixed load where 1 request in 10 is hostile (issue 12, goals).

Starts one real replica (``lockstep serve`` with ``LOCKSTEP_API_TOKEN``, no shared folder, the built-in tiny
model), then for ``--duration`` seconds keeps ``--clients`` threads sending requests back to back: nine in ten
are normal greedy ``POST /generate`` calls whose text is checked against the model's own greedy answer, one in
ten is hostile, cycling through:

* out-of-range numbers (``top_k`` 2**63, ``temperature`` 1e999 / NaN / 5e-324, ``max_new_tokens`` 10**12,
  negative seeds) on /generate and the OpenAI routes;
* huge bodies (3 MB prompts; a ``Content-Length`` of 200 MB with a few bytes behind it);
* deep and wide JSON (100 000 nested arrays, 50 000 unknown fields, a 100 000-entry ``stop`` list);
* hostile chat (5 000 messages, content parts that are not text, 1 MB of message text);
* admin calls without the token, with malformed bodies.

Meanwhile one thread polls ``GET /healthz`` every 20 ms. Printed: normal requests and their failures
(non-200 or a text other than the model's), hostile outcomes by kind and status, and /healthz p50/p99/max.
Goals: 0 normal failures, /healthz p99 < 100 ms.

    .venv/bin/python benchmarks/hostile_load.py --duration 30 --clients 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from common import PROMPTS, ensure_models, fmt_ms, machine, percentile, reference_texts, replica  # type: ignore[import-not-found]

TOKEN = "hostile-load-benchmark-7d2f0c9b1e5a4c3d"
MAX_NEW = 8
HEALTHZ_EVERY_S = 0.02


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _raw_lie(url: str) -> int:
    """POST /generate announcing 200 MB, sending 16 bytes; the status line the server answers (0: none)."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {200 * 1024 * 1024}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b'{"prompt": "x", ')
        try:
            line = sock.recv(64).split(b"\r\n", 1)[0]
        except OSError:
            return 0
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


# Each hostile kind: (name, how to send it). They return the HTTP status (0: no answer / connection error).
def hostile_kinds(url: str) -> list[tuple[str, Callable[[httpx.Client], int]]]:
    def post(path: str, body: bytes, headers: dict[str, str] | None = None) -> Callable[[httpx.Client], int]:
        def send(client: httpx.Client) -> int:
            return client.post(url + path, content=body,
                               headers={"Content-Type": "application/json", **(headers or {})}).status_code
        return send

    gen = {"prompt": "Once upon a time", "max_new_tokens": MAX_NEW}
    nan_body = json.dumps({**gen, "temperature": math.nan}).encode()  # NaN literal, as Python writes it
    return [
        ("numbers:top_k=2**63", post("/generate", _json({**gen, "temperature": 1.0, "top_k": 2**63}))),
        ("numbers:temperature=5e-324", post("/generate", _json({**gen, "temperature": 5e-324}))),
        ("numbers:temperature=1e999", post("/generate", b'{"prompt": "x", "temperature": 1e999}')),
        ("numbers:temperature=NaN", post("/generate", nan_body)),
        ("numbers:max_new_tokens=10**12", post("/generate", _json({**gen, "max_new_tokens": 10**12}))),
        ("numbers:seed=-1", post("/generate", _json({**gen, "seed": -1}))),
        ("numbers:openai top_p=5e-324", post("/v1/completions", _json(
            {"model": "lockstep", "prompt": "The cat", "max_tokens": 4, "temperature": 1.0, "top_p": 5e-324}))),
        ("numbers:openai n=10**9", post("/v1/completions", _json(
            {"model": "lockstep", "prompt": "The cat", "max_tokens": 4, "n": 10**9}))),
        ("huge:3MB prompt", post("/generate", _json({**gen, "prompt": "a" * 3_000_000}))),
        ("huge:Content-Length 200MB", lambda client: _raw_lie(url)),
        ("deep:100k nested arrays", post("/generate", b'{"prompt": "x", "stop": ' + b"[" * 100_000 + b"]" * 100_000
                                         + b"}")),
        ("deep:100k nested objects", post("/generate", b'{"a":' * 100_000 + b"1" + b"}" * 100_000)),
        ("wide:50k unknown fields", post("/generate", _json({**gen, **{f"k{i}": i for i in range(50_000)}}))),
        ("wide:100k stop strings", post("/generate", _json({**gen, "stop": ["z"] * 100_000}))),
        ("chat:5000 messages", post("/v1/chat/completions", _json(
            {"model": "lockstep", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}] * 5000}))),
        ("chat:non-text parts", post("/v1/chat/completions", _json(
            {"model": "lockstep", "max_tokens": 4, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}))),
        ("chat:1MB of text", post("/v1/chat/completions", _json(
            {"model": "lockstep", "max_tokens": 4, "messages": [{"role": "user", "content": "b" * 900_000}]}))),
        ("admin:no token, malformed", post("/admin/stage", b"{not json")),
        ("admin:no token, big dir", post("/admin/stage", _json({"model": "/", "version": 9}))),
        ("admin:commit NaN with token", post("/admin/commit", b'{"version": 1, "activate_at": NaN}',
                                             {"Authorization": f"Bearer {TOKEN}"})),
    ]


class Load:
    def __init__(self, url: str, expected: dict[str, str], clients: int, hostile_every: int) -> None:
        self.url = url
        self.expected = expected
        self.clients = clients
        self.hostile_every = hostile_every
        self.stop = threading.Event()
        self.counter = itertools.count()
        self.lock = threading.Lock()
        self.normal = 0
        self.normal_failures: list[str] = []
        self.hostile: dict[str, Counter[int | str]] = defaultdict(Counter)
        self.healthz: list[float] = []
        self.healthz_failures: list[str] = []
        self.kinds = hostile_kinds(url)

    def client(self) -> None:
        with httpx.Client(timeout=120, trust_env=False) as client:
            while not self.stop.is_set():
                i = next(self.counter)
                if i % self.hostile_every == self.hostile_every - 1:
                    name, send = self.kinds[(i // self.hostile_every) % len(self.kinds)]
                    try:
                        outcome: int | str = send(client)
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    except OSError as exc:
                        outcome = type(exc).__name__
                    with self.lock:
                        self.hostile[name][outcome] += 1
                    continue
                prompt = PROMPTS[i % len(PROMPTS)]
                try:
                    r = client.post(self.url + "/generate",
                                    json={"prompt": prompt, "max_new_tokens": MAX_NEW, "temperature": 0})
                    ok = r.status_code == 200 and r.json()["text"] == self.expected[prompt]
                    why = "" if ok else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, why = False, f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.normal += 1
                    if not ok:
                        self.normal_failures.append(f"{prompt!r}: {why}")

    def poll_healthz(self) -> None:
        with httpx.Client(timeout=5, trust_env=False) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    r = client.get(self.url + "/healthz")
                    took = time.monotonic() - started
                    if r.status_code == 200:
                        self.healthz.append(took)
                    else:
                        self.healthz_failures.append(str(r.status_code))
                except httpx.HTTPError as exc:
                    self.healthz_failures.append(type(exc).__name__)
                    self.healthz.append(time.monotonic() - started)
                self.stop.wait(HEALTHZ_EVERY_S)

    def run(self, duration_s: float) -> None:
        threads = [threading.Thread(target=self.client, daemon=True) for _ in range(self.clients)]
        threads.append(threading.Thread(target=self.poll_healthz, daemon=True))
        for t in threads:
            t.start()
        self.stop.wait(duration_s)
        self.stop.set()
        for t in threads:
            t.join(timeout=180)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    parser.add_argument("--hostile-every", type=int, default=10, help="1 request in N is hostile (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the replica")
    args = parser.parse_args()

    info = machine()
    print(f"machine: {info}", flush=True)
    models = ensure_models(["tiny-s0"])
    expected = reference_texts(models["tiny-s0"], PROMPTS, MAX_NEW)
    with tempfile.TemporaryDirectory(prefix="hostile-load-") as tmp, \
            replica("builtin:tiny-s0", Path(tmp), args.threads, LOCKSTEP_API_TOKEN=TOKEN) as proc:
        load = Load(proc.url, expected, args.clients, args.hostile_every)
        load.run(args.duration)
        alive = proc.alive() and proc.ready()
        log_tail = proc.log()[-2000:]

    hz = load.healthz
    print()
    print(f"duration {args.duration:.0f}s, {args.clients} clients, 1 request in {args.hostile_every} hostile")
    print(f"normal requests: {load.normal}, failures: {len(load.normal_failures)}")
    for line in load.normal_failures[:10]:
        print(f"  - {line}")
    print("hostile outcomes (kind: status → count):")
    for name, _ in load.kinds:
        outcomes = load.hostile.get(name)
        shown = ", ".join(f"{k}→{v}" for k, v in sorted(outcomes.items(), key=str)) if outcomes else "(not sent)"
        print(f"  {name:32s} {shown}")
    print(f"/healthz: {len(hz)} polls, p50 {fmt_ms(percentile(hz, 50))}, p99 {fmt_ms(percentile(hz, 99))}, "
          f"max {fmt_ms(max(hz) if hz else math.nan)}, failures {len(load.healthz_failures)}")
    print(f"replica alive and ready after the load: {alive}")
    server_errors = sum(v for c in load.hostile.values() for k, v in c.items() if isinstance(k, int) and k >= 500)
    goals = {
        "0 normal failures": not load.normal_failures,
        "healthz p99 < 100 ms": bool(hz) and percentile(hz, 99) < 0.1,
        "no 5xx to hostile requests": server_errors == 0,
        "replica still ready": alive,
    }
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    if not alive:
        print(log_tail, file=sys.stderr)
    print(f"load average after: {machine()['load_avg']}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
