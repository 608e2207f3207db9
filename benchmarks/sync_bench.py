"""Benchmark: synchronized publishes across N replicas under sustained load (issue 4), against the seed's design.

For each model size and replica count, start N real replicas sharing a temporary folder, keep a steady
load of greedy ``POST /generate`` requests on every replica, and publish 20 versions one after the other:

- ``two-phase``: ``Coordinator.publish`` over the shared folder (stage everywhere, verify, commit at one
  ``activate_at``);
- ``http``: the same ``Coordinator`` over the replicas' URLs, no shared folder (what ``lockstep publish --urls``
  and the trainer without a volume do): ``POST /admin/stage``, ``/admin/commit``;
- ``naive`` (baseline, the seed's design): the legacy ``{"desired_model_repo_id": ...}`` file, each replica
  loads and flips on its own as soon as its load finishes (``LOCKSTEP_SYNC_MODE=naive``).

Reported: failed and mislabeled responses, flip skew (first to last replica serving the new version,
from each replica's ``serving_since``) p50/p99/max, propagation (publish call → last replica serving) against
the staging load time (the slowest replica's own stage time: resolve, verify, load, canary, engine), the
mixed-version window seen by clients, and the polling cost of an idle replica (% of a core, whole process,
over ``--idle-window`` seconds once every replica is ready and settled). For two-phase publishes,
propagation − load is broken down into: waiting for stage reports beyond the load (prepare seen one poll
later, replicas starting at different times, the coordinator noticing), the commit margin (commit →
``activate_at``), and flip lateness (``activate_at`` → last replica serving).

    .venv/bin/python benchmarks/sync_bench.py --sizes tiny mid --replicas 2 4 --publishes 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_seconds  # noqa: E402
from tests.support.cluster import Proc, base_env, free_port, spawn, wait_for  # noqa: E402

from lockstep.core.atomic import atomic_write_json  # noqa: E402
from lockstep.core.clock import SYSTEM_CLOCK  # noqa: E402
from lockstep.core.settings import Settings  # noqa: E402
from lockstep.models.tiny import ensure_builtin  # noqa: E402
from lockstep.sync.coordinator import Coordinator  # noqa: E402
from lockstep.sync.http_fleet import HttpFleet  # noqa: E402
from lockstep.sync.protocol import LegacyRequest  # noqa: E402

PROMPTS = ["The cat", "Two plus three", "Once upon a time", "Colours of the sky"]


@dataclass
class Response:
    replica: str
    started: float
    ended: float
    ok: bool
    header_version: int | None = None
    body_version: int | None = None
    source: str | None = None
    prompt: str = ""
    text: str = ""
    error: str = ""


@dataclass
class Load:
    """Client threads sending greedy requests to every replica until stopped."""

    replicas: list[Proc]
    per_replica: int = 2
    responses: list[Response] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._run, args=(r, i), daemon=True)
                        for r in self.replicas for i in range(self.per_replica)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _run(self, replica: Proc, i: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = i
            while not self._stop.is_set():
                prompt = PROMPTS[n % len(PROMPTS)]
                n += 1
                started = time.time()
                try:
                    r = client.post(replica.url + "/generate",
                                    json={"prompt": prompt, "max_new_tokens": 8, "temperature": 0})
                    ended = time.time()
                    if r.status_code != 200:
                        self.responses.append(Response(replica.name, started, ended, False, prompt=prompt,
                                                       error=f"{r.status_code} {r.text[:200]}"))
                        continue
                    body = r.json()
                    self.responses.append(Response(replica.name, started, ended, True,
                                                   int(r.headers["x-model-version"]), body["model_version"],
                                                   r.headers["x-model-repo-id"], prompt, body["text"]))
                except httpx.HTTPError as exc:
                    self.responses.append(Response(replica.name, started, time.time(), False, prompt=prompt,
                                                   error=str(exc)))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_case(size: str, n_replicas: int, mode: str, publishes: int, builtin_dir: Path,
             idle_window: float = 30.0) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix=f"lockstep-bench-{size}-{n_replicas}-{mode}-"))
    shared = root / "shared"
    shared.mkdir()
    # http: no shared folder; the coordinator drives the replicas' admin endpoints (lockstep publish --urls)
    folder = {} if mode == "http" else {"LOCKSTEP_SHARED_DIR": str(shared)}
    env = base_env(builtin_dir, **folder, INITIAL_MODEL_REPO_ID=f"builtin:{size}-s0",
                   LOCKSTEP_SYNC_MODE="naive" if mode == "naive" else "two-phase", LOCKSTEP_POLL_INTERVAL_S="0.1",
                   LOCKSTEP_HEARTBEAT_INTERVAL_S="0.5", LOCKSTEP_HEARTBEAT_TTL_S="10", LOCKSTEP_STAGE_TIMEOUT_S="600")
    replicas = []
    for i in range(n_replicas):
        port = free_port()
        replicas.append(spawn(f"r{i + 1}", ["serve", "--port", str(port)], {**env, "LOCKSTEP_REPLICA_ID": f"r{i + 1}"},
                              root / "logs", port))
    try:
        for r in replicas:
            wait_for(r.ready, 600, 0.2, f"{r.name} ready")
        time.sleep(5)  # boot leftovers (freeing the loader's buffers, first heartbeats) are not polling
        before = {r.name: cpu_seconds(r.process.pid) for r in replicas}
        time.sleep(idle_window)
        polling_pct = [100 * (cpu_seconds(r.process.pid) - before[r.name]) / idle_window for r in replicas]

        if mode == "http":
            settings = Settings(shared_dir=None, poll_interval_s=0.1, stage_timeout_s=600)
            urls = [r.url for r in replicas]
            coordinator = Coordinator.over_http(settings, HttpFleet(settings, lambda: urls, clock=SYSTEM_CLOCK),
                                                clock=SYSTEM_CLOCK, owner="bench", data_dir=None)
        else:
            settings = Settings(shared_dir=shared, poll_interval_s=0.1, heartbeat_ttl_s=10, stage_timeout_s=600)
            coordinator = Coordinator(settings, clock=SYSTEM_CLOCK, owner="bench")
        load = Load(replicas)
        load.start()
        time.sleep(2)
        skews, propagations, load_times, publish_marks = [], [], [], []
        waits, margins, lateness = [], [], []  # two-phase: where propagation − load goes
        for i in range(publishes):
            model = f"builtin:{size}-s{1 if i % 2 == 0 else 0}"
            if mode != "naive":
                source = coordinator.prepare_source(model)  # the copy into the store is not propagation
                t0 = time.time()
                result = coordinator.publish(model, source=source)
                assert result.outcome == "committed", result.summary()
                version = result.version
                load_times.append(max(r.stage_seconds or 0 for r in result.replicas))
            else:
                version = i + 1
                t0 = time.time()
                atomic_write_json(shared / "sync_state.json", {"desired_model_repo_id": model})
            def all_serving(v: int = version) -> list[dict[str, object]] | None:
                statuses = [r.status() for r in replicas]
                return statuses if all(x["serving_version"] == v for x in statuses) else None

            statuses = wait_for(all_serving, 600, 0.05, f"all replicas at v{version}")
            since = [s["serving_since"] for s in statuses]
            skews.append(max(since) - min(since))
            propagations.append(max(since) - t0)
            if mode == "naive":
                load_times.append(max(since) - t0)
            else:
                assert result.activate_at is not None
                state = coordinator.ledger.read()
                assert state is not None and not isinstance(state, LegacyRequest) and state.committed is not None
                committed_at = state.committed.committed_at
                assert committed_at is not None
                waits.append(committed_at - t0 - load_times[-1])
                margins.append(result.activate_at - committed_at)
                lateness.append(max(since) - result.activate_at)
            publish_marks.append((t0, version))
            time.sleep(1.0)
        load.stop()
    finally:
        for r in replicas:
            r.process.terminate()
        for r in replicas:
            try:
                r.process.wait(timeout=20)
            except Exception:
                r.kill()

    responses = load.responses
    failed = [r for r in responses if not r.ok]
    expected: dict[tuple[str, str], set[str]] = {}
    source_of: dict[str, str] = {}
    for m in (shared / "versions").glob("*/MANIFEST.json"):
        data = json.loads(m.read_text())
        source_of[f"versions/{data['version']:06d}"] = data.get("source") or ""
    for r in responses:
        if r.ok:
            model = source_of.get(r.source or "", r.source or "")
            expected.setdefault((model, r.prompt), set()).add(r.text)
    texts_by_prompt: dict[str, dict[str, set[str]]] = {}
    for (model, prompt), texts in expected.items():
        texts_by_prompt.setdefault(prompt, {})[model] = texts
    mislabeled = 0
    for r in responses:
        if not r.ok:
            continue
        model = source_of.get(r.source or "", r.source or "")
        if r.header_version != r.body_version:
            mislabeled += 1
            continue
        others = [t for m, ts in texts_by_prompt[r.prompt].items() if m != model for t in ts]
        if len(expected[(model, r.prompt)]) > 1 and r.text in others:
            mislabeled += 1  # this text belongs to another model's output
    # Mixed-version window seen by clients: for each publish, old-version answers started after the first
    # new-version answer started.
    windows = []
    for t0, version in publish_marks:
        new_starts = [r.started for r in responses if r.ok and r.header_version == version]
        if not new_starts:
            continue
        first_new = min(new_starts)
        old_after = [r.started for r in responses if r.ok and r.header_version is not None
                     and r.header_version < version and r.started >= t0]
        windows.append(max(0.0, max(old_after, default=first_new) - first_new))
    return {
        "size": size, "replicas": n_replicas, "mode": mode, "publishes": publishes,
        "requests": len(responses), "failed": len(failed), "mislabeled": mislabeled,
        "failed_examples": [f.error for f in failed[:3]],
        "skew_ms": {"p50": 1000 * pct(skews, 0.5), "p99": 1000 * pct(skews, 0.99), "max": 1000 * max(skews)},
        "propagation_s": {"p50": pct(propagations, 0.5), "max": max(propagations)},
        "load_s": {"p50": pct(load_times, 0.5), "max": max(load_times)},
        "propagation_minus_load_s_max": max(p - lt for p, lt in zip(propagations, load_times, strict=True)),
        "mixed_window_ms": {"p50": 1000 * pct(windows, 0.5), "max": 1000 * max(windows, default=0.0)},
        "polling_cpu_pct_per_replica": round(statistics.mean(polling_pct), 3),
        "polling_cpu_pct_max": round(max(polling_pct), 3),
        "idle_window_s": idle_window,
        "breakdown_s": {name: {"p50": pct(values, 0.5), "max": max(values)}
                        for name, values in (("wait_beyond_load", waits), ("commit_margin", margins),
                                             ("flip_lateness", lateness)) if values},
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--replicas", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--modes", nargs="+", default=["two-phase", "http", "naive"],
                        help="two-phase: shared folder; http: replica URLs, no shared folder; naive: the seed")
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--idle-window", type=float, default=30.0, help="seconds of idle CPU measurement")
    parser.add_argument("--builtin-dir", default=str(REPO / "var" / "bench-models" / "builtin"))
    parser.add_argument("--out", default=str(REPO / "var" / "sync_bench.json"))
    args = parser.parse_args()
    builtin_dir = Path(args.builtin_dir)
    for size in args.sizes:
        for seed in (0, 1):
            ensure_builtin(f"{size}-s{seed}", builtin_dir)
    results = []
    for size in args.sizes:
        for n in args.replicas:
            for mode in args.modes:
                print(f"== {size} × {n} replicas, {mode}", flush=True)
                result = run_case(size, n, mode, args.publishes, builtin_dir, args.idle_window)
                print(json.dumps(result), flush=True)
                results.append(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                          "cpus": os.cpu_count(), "results": results}, indent=2))
    print("\n| model | replicas | mode | requests | failed | mislabeled | skew p50 / p99 / max (ms) | "
          "propagation p50 / max (s) | load p50 (s) | propagation − load max (s) | mixed window max (ms) | "
          "polling CPU % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        s, p, lt, w = r["skew_ms"], r["propagation_s"], r["load_s"], r["mixed_window_ms"]
        print(f"| {r['size']} | {r['replicas']} | {r['mode']} | {r['requests']} | {r['failed']} | {r['mislabeled']} | "
              f"{s['p50']:.1f} / {s['p99']:.1f} / {s['max']:.1f} | {p['p50']:.2f} / {p['max']:.2f} | "
              f"{lt['p50']:.2f} | {r['propagation_minus_load_s_max']:.2f} | {w['max']:.0f} | "
              f"{r['polling_cpu_pct_per_replica']:.2f} |")
    for r in results:
        if r.get("breakdown_s"):
            parts = ", ".join(f"{name.replace('_', ' ')} {b['p50']:.3f} / {b['max']:.3f}"
                              for name, b in r["breakdown_s"].items())
            print(f"{r['size']} × {r['replicas']}: propagation − load, p50 / max (s): {parts}")


if __name__ == "__main__":
    main()
