"""Benchmark: hot swaps on one replica under sustained concurrent load (issue 2.7).

For each model size, start one real replica (``lockstep serve``, no shared folder), keep CLIENTS threads
sending greedy ``POST /generate`` requests back to back, and swap the model ``--swaps`` times
(``<size>-s0`` ↔ ``<size>-s1`` through ``POST /update-model``), waiting for each flip before the next.

Reported per size: failed requests; mislabelled answers (text not what the model named in the headers
writes, or headers ≠ body); the longest gap between two successful answers before and during the swaps;
p50/p99 latency of requests before the swaps vs requests in flight while a swap loads and flips; and the
load time (``lockstep_model_load_duration_seconds``) against the flip itself
(``lockstep_swap_duration_seconds``).

    .venv/bin/python benchmarks/swap_bench.py --sizes tiny mid --swaps 10
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import (  # type: ignore[import-not-found]
    BENCH_MODELS,
    PROMPTS,
    ensure_models,
    fmt_ms,
    metric_totals,
    percentile,
    reference_texts,
    replica,
    run_sizes,
)


@dataclass
class Record:
    """One request as a client saw it (monotonic seconds)."""

    start: float
    end: float
    prompt: str
    ok: bool
    version: int | None = None
    model: str | None = None
    body_version: int | None = None
    body_model: str | None = None
    text: str = ""
    error: str = ""


@dataclass
class Load:
    """CLIENTS threads calling /generate back to back until stopped."""

    url: str
    clients: int
    max_new_tokens: int
    records: list[Record] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=600)

    def wait_answers(self, since: float, count: int, at_least_s: float = 0.0, timeout: float = 900) -> float:
        """Block until ``count`` successful answers ended after ``since`` and ``at_least_s`` passed; now."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done = sum(1 for r in self.records if r.ok and r.end >= since)
            if done >= count and time.monotonic() >= since + at_least_s:
                break
            time.sleep(0.05)
        return time.monotonic()

    def _run(self, client: int) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=600) as http:
            while not self._stop.is_set():
                prompt = PROMPTS[(client + n) % len(PROMPTS)]
                n += 1
                start = time.monotonic()
                try:
                    r = http.post(
                        "/generate",
                        json={"prompt": prompt, "max_new_tokens": self.max_new_tokens, "temperature": 0},
                    )
                except httpx.HTTPError as exc:
                    rec = Record(start, time.monotonic(), prompt, False, error=repr(exc))
                else:
                    end = time.monotonic()
                    if r.status_code == 200:
                        body = r.json()
                        rec = Record(
                            start,
                            end,
                            prompt,
                            True,
                            int(r.headers["x-model-version"]),
                            r.headers["x-model-repo-id"],
                            body["model_version"],
                            body["model_repo_id"],
                            body["text"],
                        )
                    else:
                        rec = Record(start, end, prompt, False, error=f"{r.status_code} {r.text[:200]}")
                with self._lock:
                    self.records.append(rec)


@dataclass
class Swap:
    version: int
    model: str
    posted: float  # monotonic, client side
    seen: float  # monotonic: /status first showed the new version


def wait_version(url: str, version: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = httpx.get(url + "/status", timeout=30).json()
        if st["serving_version"] == version:
            return
        if st["staged"] and st["staged"]["state"] == "failed":
            raise RuntimeError(f"v{version} failed to stage: {st['staged']['error']}")
        time.sleep(0.01)
    raise TimeoutError(f"v{version} not served after {timeout}s")


def longest_gap(ends: list[float], start: float, stop: float) -> float:
    """Longest time without a successful answer inside [start, stop]."""
    points = [start] + sorted(e for e in ends if start <= e <= stop) + [stop]
    return max(b - a for a, b in zip(points, points[1:], strict=False))


def run_size(size: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    names = [f"{size}-s0", f"{size}-s1"]
    dirs = ensure_models(names)
    n = args.max_new_tokens
    expected = {f"builtin:{name}": reference_texts(dirs[name], PROMPTS, n) for name in names}
    expected["builtin:" + size] = expected[f"builtin:{size}-s0"]
    models = {0: f"builtin:{size}-s0"}
    with replica(models[0], log_dir, args.threads, LOCKSTEP_ENGINE=args.engine) as proc:
        load = Load(proc.url, args.clients, n)
        t_load = time.monotonic()
        load.start()
        warm = load.wait_answers(t_load, args.clients)  # every client past its first (cold) answer
        load.wait_answers(warm, args.before_requests, args.before_s)
        before = metric_totals(proc.url)
        t_swaps = time.monotonic()
        swaps: list[Swap] = []
        for i in range(1, args.swaps + 1):
            model = f"builtin:{size}-s{i % 2}"
            posted = time.monotonic()
            r = httpx.post(proc.url + "/update-model", json={"model_repo_id": model}, timeout=60)
            r.raise_for_status()
            version = r.json()["version"]
            models[version] = model
            wait_version(proc.url, version)
            swaps.append(Swap(version, model, posted, time.monotonic()))
            print(f"  {size}: v{version} ({model}) served {swaps[-1].seen - posted:.1f}s after the POST")
            load.wait_answers(swaps[-1].seen, args.clients, args.settle_s)  # serve a while before the next
        t_end = time.monotonic()
        after = metric_totals(proc.url)
        load.stop()

    recs = load.records
    ok = [r for r in recs if r.ok]
    failed = [r for r in recs if not r.ok]
    mislabelled = [
        r
        for r in ok
        if r.version != r.body_version
        or r.model != r.body_model
        or r.version not in models
        or models[r.version] != r.model
        or expected[r.model or ""][r.prompt] != r.text
    ]
    lat_before = [r.end - r.start for r in ok if r.start >= warm and r.end <= t_swaps]
    in_swap = [r.end - r.start for r in ok if any(r.start < s.seen and r.end > s.posted for s in swaps)]
    ends = [r.end for r in ok]

    def delta_mean(name: str) -> float:
        count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        return (after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)) / count if count else float("nan")

    return {
        "size": size,
        "clients": args.clients,
        "max_new_tokens": n,
        "swaps": len(swaps),
        "requests": len(recs),
        "failed": len(failed),
        "mislabelled": len(mislabelled),
        "failed_examples": [asdict(r) for r in failed[:3]],
        "mislabelled_examples": [asdict(r) for r in mislabelled[:3]],
        "longest_gap_before_s": longest_gap(ends, warm, t_swaps),
        "longest_gap_during_s": longest_gap(ends, t_swaps, t_end),
        "latency_before_p50_s": percentile(lat_before, 50),
        "latency_before_p99_s": percentile(lat_before, 99),
        "latency_in_swap_p50_s": percentile(in_swap, 50),
        "latency_in_swap_p99_s": percentile(in_swap, 99),
        "requests_before": len(lat_before),
        "requests_in_swap": len(in_swap),
        "load_mean_s": delta_mean("lockstep_model_load_duration_seconds"),
        "flip_mean_s": delta_mean("lockstep_swap_duration_seconds"),
        "post_to_served_mean_s": sum(s.seen - s.posted for s in swaps) / len(swaps),
        "post_to_served_max_s": max(s.seen - s.posted for s in swaps),
    }


def markdown(results: list[dict[str, Any]]) -> str:
    rows = [
        "| model | requests | failed | mislabelled | longest gap before / during | p50 before / in swap "
        "| p99 before / in swap | load (mean) | flip (mean) | POST → served (mean / max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['size']} | {r['requests']} | {r['failed']} | {r['mislabelled']} "
            f"| {fmt_ms(r['longest_gap_before_s'])} / {fmt_ms(r['longest_gap_during_s'])} "
            f"| {fmt_ms(r['latency_before_p50_s'])} / {fmt_ms(r['latency_in_swap_p50_s'])} "
            f"| {fmt_ms(r['latency_before_p99_s'])} / {fmt_ms(r['latency_in_swap_p99_s'])} "
            f"| {r['load_mean_s']:.2f} s | {r['flip_mean_s'] * 1000:.2f} ms "
            f"| {r['post_to_served_mean_s']:.2f} s / {r['post_to_served_max_s']:.2f} s |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, each back to back")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--before-requests", type=int, default=32, help="answers measured before the swaps")
    parser.add_argument("--before-s", type=float, default=10.0, help="and at least this long (seconds)")
    parser.add_argument(
        "--settle-s", type=float, default=2.0, help="after a flip: CLIENTS answers and at least this long"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the replica (default: torch's)"
    )
    parser.add_argument(
        "--engine", default="auto", choices=["auto", "builtin", "vllm"],
        help="LOCKSTEP_ENGINE of the replica (auto: vLLM where it is installed; a swap then starts a vLLM engine)"
    )
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of every process measured ('' = the library's default, ACTIVE-ish); "
        "PASSIVE keeps idle OpenMP threads from spinning, which on a shared machine costs 10-25x",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch loads OpenMP; children inherit it

    print(f"models cached in {BENCH_MODELS}")
    run_sizes(args, run_size, markdown, "swap-bench-")

if __name__ == "__main__":
    main()
