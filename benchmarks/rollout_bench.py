"""Benchmark: rollouts on real replicas under load (issue 15's goals).

N replicas (child processes, no shared folder, driven over HTTP like ``lockstep publish --urls``) answer a
closed loop of greedy ``POST /generate`` requests from ``--clients`` threads; a share of them carry a session key
(``X-Lockstep-Session``). Every answer is checked against the greedy reference text of the version it names, so a
mislabelled answer is caught wherever the two versions write different text. Measured:

1. **shadow cost**: served latency p99 with no rollout, then during a shadow-only step (``--shadow`` percent of the
   committed version's prompts also run on the candidate), alternating, each window ``--window`` seconds;
2. **a good candidate** (the committed model with every weight nudged by ``--good-noise`` of its spread) through
   ``--canary`` (default 5,25,100): failed and mislabelled answers, the split of requests without a session per
   step and its χ² against the configured share (the 25% step holds for ``--split-requests`` such requests),
   sessions that saw two versions before the promotion, the flip skew of every step;
3. **a degraded candidate** that still answers 200 (every weight nudged by ``--bad-noise``: its text diverges):
   with a shadow step first (the recommended recipe) and, separately, a first canary step of ``--bad-share``
   percent without shadowing: seconds from its first step to the rollback, the share of requests it served, and
   the rollback's flip skew across replicas.

    .venv/bin/python benchmarks/rollout_bench.py --size tiny --replicas 2 --json var/rollout-bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_models, machine, percentile, reference_texts, replica  # noqa: E402

from lockstep.core.clock import SYSTEM_CLOCK  # noqa: E402
from lockstep.core.settings import Settings  # noqa: E402
from lockstep.sync.coordinator import Coordinator  # noqa: E402
from lockstep.sync.http_fleet import HttpFleet  # noqa: E402
from lockstep.sync.rollout import RolloutControl, make_plan  # noqa: E402

PROMPTS = [f"{a} {b}" for a in ("Once upon a time", "The cat sat on", "One, two, three,", "Colours of the sky")
           for b in ("the", "a", "and", "we")]
MAX_NEW = 8


@dataclass
class Answer:
    sent: float
    done: float
    session: str | None
    status: int
    version: int
    prompt: str
    text: str


@dataclass
class Load:
    """Closed-loop clients at random replicas until stopped; ``session_share`` of requests carry a session key."""

    urls: list[str]
    clients: int
    session_share: float
    sessions: int = 200
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                session = f"conversation-{rng.randrange(self.sessions)}" if rng.random() < self.session_share else None
                prompt = rng.choice(PROMPTS)
                sent = time.time()
                try:
                    r = http.post(rng.choice(self.urls) + "/generate",
                                  headers={"X-Lockstep-Session": session} if session else {},
                                  json={"prompt": prompt, "max_new_tokens": MAX_NEW, "temperature": 0})
                    body = r.json() if r.status_code == 200 else {}
                    answer = Answer(sent, time.time(), session, r.status_code,
                                    int(r.headers.get("x-model-version", -1)), prompt, body.get("text", ""))
                except httpx.HTTPError:
                    answer = Answer(sent, time.time(), session, 0, -1, prompt, "")
                self.answers.append(answer)

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for a in list(self.answers) if start <= a.sent and a.done <= end]

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)


@dataclass
class OpenLoad:
    """Requests at Poisson arrival times, ``rate`` per second, whatever the answers take (open loop): latency at a
    utilization below saturation, where a server has idle capacity for shadow work."""

    urls: list[str]
    rate: float
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> OpenLoad:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(64, thread_name_prefix="open-load")
        self.thread = threading.Thread(target=self._arrivals, daemon=True)
        self.thread.start()
        return self

    def _arrivals(self) -> None:
        rng = random.Random(7)
        http = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64))
        at = time.monotonic()
        while not self.stop.is_set():
            at += rng.expovariate(self.rate)
            time.sleep(max(0.0, at - time.monotonic()))
            self.pool.submit(self._one, http, rng.choice(self.urls), rng.choice(PROMPTS))

    def _one(self, http: httpx.Client, url: str, prompt: str) -> None:
        sent = time.time()
        try:
            r = http.post(url + "/generate", json={"prompt": prompt, "max_new_tokens": MAX_NEW, "temperature": 0})
            self.answers.append(Answer(sent, time.time(), None, r.status_code,
                                       int(r.headers.get("x-model-version", -1)), prompt,
                                       r.json().get("text", "") if r.status_code == 200 else ""))
        except httpx.HTTPError:
            self.answers.append(Answer(sent, time.time(), None, 0, -1, prompt, ""))

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for a in list(self.answers) if start <= a.sent and a.done <= end]

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        self.pool.shutdown(wait=True)


def nudged(base: Path, out: Path, noise: float, seed: int) -> Path:
    """``base`` with every weight matrix plus Gaussian noise of ``noise`` times its own spread."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    tensors = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if t.ndim == 2 and t.is_floating_point():
            tensors[name] = t + noise * t.float().std() * torch.randn(t.shape, generator=gen).to(t.dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def chi_square(candidate: int, total: int, share: float) -> tuple[float, float]:
    """χ² of the candidate's count against ``share`` percent of ``total`` (1 degree of freedom) and its p-value."""
    expected = total * share / 100
    chi2 = (candidate - expected) ** 2 / expected + (candidate - expected) ** 2 / (total - expected)
    return chi2, math.erfc(math.sqrt(chi2 / 2))


def skew_ms(statuses: list[dict[str, Any]], rollout: str, share: float | None = None) -> dict[int, float]:
    """Per step of ``rollout``: the spread of the replicas' times putting it in force (ms)."""
    at: dict[int, list[float]] = {}
    for status in statuses:
        for s in status.get("splits", []):
            if s["rollout"] == rollout and (share is None or s["share"] == share):
                at.setdefault(s["step"], []).append(s["at"])
    return {step: 1000 * (max(t) - min(t)) for step, t in at.items() if len(t) == len(statuses)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size
    models = ensure_models([f"{size}-s0"])
    work = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    good = nudged(models[f"{size}-s0"], work / "good", args.good_noise, 1)
    bad = nudged(models[f"{size}-s0"], work / "bad", args.bad_noise, 2)
    split_candidate = nudged(good, work / "split", args.good_noise, 3)  # new content again, as good as good
    refs = {"base": reference_texts(models[f"{size}-s0"], PROMPTS, MAX_NEW),
            "good": reference_texts(good, PROMPTS, MAX_NEW), "bad": reference_texts(bad, PROMPTS, MAX_NEW),
            "split": reference_texts(split_candidate, PROMPTS, MAX_NEW)}
    distinct = {k: sum(refs["base"][p] != refs[k][p] for p in PROMPTS) for k in ("good", "bad")}
    print(f"prompts whose text differs from the base model: good {distinct['good']}/{len(PROMPTS)}, "
          f"bad {distinct['bad']}/{len(PROMPTS)}", file=sys.stderr)
    env = {"LOCKSTEP_ENGINE": "builtin", "LOCKSTEP_DTYPE": "float32", "LOCKSTEP_HEARTBEAT_INTERVAL_S": "0.5"}
    out: dict[str, Any] = {"machine": machine(), "size": size, "replicas": args.replicas, "clients": args.clients,
                           "differing_prompts": distinct}
    with _replicas(args, work, env) as procs:
        urls = [p.url for p in procs]
        settings = Settings(poll_interval_s=0.05, stage_timeout_s=600)
        coordinator = Coordinator.over_http(settings, HttpFleet(settings, lambda: urls, clock=SYSTEM_CLOCK),
                                            clock=SYSTEM_CLOCK, owner="bench", data_dir=None)
        texts = {0: refs["base"]}

        def statuses() -> list[dict[str, Any]]:
            return [httpx.get(u + "/status", timeout=30).json() for u in urls]

        # 1. shadow cost: no rollout vs a shadow-only step, alternating windows; saturated, then at half load
        if "shadow" in args.phases:
            load = Load(urls, args.clients, session_share=0.0).start()
            time.sleep(3)
            out["shadow_saturated"] = _shadow_cost(coordinator, good, load, args)
            load.finish()
            capacity = out["shadow_saturated"]["answers_per_s_no_rollout"]
            load = OpenLoad(urls, rate=args.load_fraction * capacity).start()
            time.sleep(3)
            out["shadow"] = {**_shadow_cost(coordinator, good, load, args), "rate_per_s": args.load_fraction * capacity}
            load.finish()
            print(f"shadow: {out['shadow']}", file=sys.stderr)
        if "rollouts" not in args.phases:
            return out

        # 2. a good candidate through its steps
        load = Load(urls, args.clients, session_share=args.session_share).start()
        time.sleep(2)
        shares = [float(s) for s in args.canary.split(",")]
        plan = make_plan(shares, step_seconds=args.step_seconds, min_requests=args.min_requests,
                         gate_specs={"latency_p99": None})
        control = RolloutControl(plan)
        started = time.time()
        result = coordinator.rollout(str(good), plan, control=control)
        time.sleep(2)
        load.finish()
        assert result.outcome == "committed", (result.summary(), control.view())
        good_v = result.version
        texts[good_v] = refs["good"]
        answers = load.between(started - 1, time.time())
        out["good"] = {"outcome": str(result.outcome), "version": good_v, "seconds": result.total_s,
                       "answers": len(answers), **_check(answers, texts),
                       "steps": _steps(control, load, good_v, result.activate_at or time.time()),
                       "skew_ms": skew_ms(statuses(), control.id),
                       "sessions_two_versions": _sessions_crossing(load.between(started, (result.activate_at or 0)
                                                                               - 0.1)),
                       "sessions": len({a.session for a in answers if a.session})}
        print(f"good: {json.dumps(out['good'])}", file=sys.stderr)
        texts = {good_v: refs["good"]}

        # 2b. the split over --split-requests requests without a session: a 25% step held until then, aborted
        load = Load(urls, args.clients, session_share=0.0).start()
        plan = make_plan([25], step_seconds=0, min_requests=10**9, gate_specs={"latency_p99": None})
        control = RolloutControl(plan)

        def count_then_abort(control: RolloutControl = control) -> None:
            while control.phase != "step":
                time.sleep(0.05)
            begin = control.steps[-1].activate_at + 0.2
            while len([a for a in load.between(begin, time.time()) if a.status == 200]) < args.split_requests:
                time.sleep(0.5)
            control.abort()

        threading.Thread(target=count_then_abort, daemon=True).start()
        result = coordinator.rollout(str(split_candidate), plan, control=control)
        load.finish()
        step = control.steps[0]
        plain = [a for a in load.between(step.activate_at + 0.2, step.ended_at or time.time()) if a.status == 200]
        hits = sum(a.version == result.version for a in plain)
        chi2, p = chi_square(hits, len(plain), 25.0)
        out["split"] = {"share": 25.0, "requests": len(plain), "candidate": hits,
                        "observed_share": 100 * hits / len(plain), "chi2": chi2, "p": p,
                        **_check(plain, {**texts, result.version: refs["split"]})}
        print(f"split: {json.dumps(out['split'])}", file=sys.stderr)

        # 3. a degraded candidate: shadow first, then without shadow at --bad-share
        out["bad"] = []
        for recipe in ("shadow", "canary"):
            load = Load(urls, args.clients, session_share=args.session_share).start()
            time.sleep(2)
            if recipe == "shadow":
                plan = make_plan([args.bad_share, 25], shadow=args.shadow, step_seconds=args.step_seconds,
                                 min_requests=args.min_requests, gate_specs={"latency_p99": None})
            else:
                plan = make_plan([args.bad_share, 25], step_seconds=args.step_seconds, min_requests=args.min_requests,
                                 gate_specs={"latency_p99": None})
            control = RolloutControl(plan)
            result = coordinator.rollout(str(bad), plan, control=control)
            time.sleep(2)
            load.finish()
            first = control.steps[0].activate_at if control.steps else float("nan")
            rolled = result.activate_at or float("nan")
            answers = load.between(first, rolled + 1)
            served = sum(a.version == result.version for a in answers)
            texts_bad = {**texts, result.version: refs["bad"]}
            entry = {"recipe": recipe, "outcome": str(result.outcome), "reason": result.reason,
                     "automatic": control.automatic_rollback, "seconds_to_rollback": rolled - first,
                     "answers": len(answers), "served_by_candidate": served,
                     "served_share": served / len(answers) if answers else float("nan"),
                     **_check(load.answers, texts_bad),
                     "rollback_skew_ms": max(skew_ms(statuses(), control.id, share=0.0).values(), default=None)}
            out["bad"].append(entry)
            print(f"bad ({recipe}): {json.dumps(entry)}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _shadow_cost(coordinator: Coordinator, candidate: Path, load: Load | OpenLoad, args: argparse.Namespace
                 ) -> dict[str, Any]:
    """Served latency with no rollout and during a shadow-only step of the candidate, in alternating windows."""
    windows: dict[str, list[float]] = {"none": [], "shadow": []}
    seconds = {"none": 0.0, "shadow": 0.0}
    dropped = compared = 0
    for _ in range(args.rounds):
        t0 = time.time()
        time.sleep(args.window)
        windows["none"] += [a.done - a.sent for a in load.between(t0, time.time()) if a.status == 200]
        seconds["none"] += time.time() - t0
        plan = make_plan(None, shadow=args.shadow, step_seconds=0, min_requests=10**9,
                         gate_specs={"latency_p99": None, "kl_divergence": None, "token_agreement": None})
        control = RolloutControl(plan)
        marks: dict[str, float] = {}

        def watch(control: RolloutControl = control, marks: dict[str, float] = marks) -> None:
            while control.phase != "step":
                time.sleep(0.05)
            marks["from"] = control.steps[-1].activate_at + 1.0
            time.sleep(args.window + 1.0)
            marks["to"] = time.time()
            control.abort()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        coordinator.rollout(str(candidate), plan, control=control)
        watcher.join()
        windows["shadow"] += [a.done - a.sent for a in load.between(marks["from"], marks["to"]) if a.status == 200]
        seconds["shadow"] += marks["to"] - marks["from"]
        if control.candidate is not None:
            dropped += control.candidate.shadow_dropped
            compared += control.candidate.compared
        time.sleep(2)
    p99 = {k: percentile(v, 99) for k, v in windows.items()}
    return {"percent": args.shadow, "p99_ms_no_rollout": 1000 * p99["none"], "p99_ms_shadow": 1000 * p99["shadow"],
            "p99_increase": p99["shadow"] / p99["none"] - 1,
            "p50_ms_no_rollout": 1000 * percentile(windows["none"], 50),
            "p50_ms_shadow": 1000 * percentile(windows["shadow"], 50),
            "answers": {k: len(v) for k, v in windows.items()},
            "answers_per_s_no_rollout": len(windows["none"]) / seconds["none"], "compared": compared,
            "shadow_dropped": dropped}


def _check(answers: list[Answer], texts: dict[int, dict[str, str]]) -> dict[str, int]:
    """Failed answers, and mislabelled ones: the text is another resident version's, not the one it names."""
    failed = sum(a.status != 200 for a in answers)
    mislabeled = 0
    for a in answers:
        if a.status != 200 or a.version not in texts:
            continue
        own = texts[a.version][a.prompt]
        if a.text != own and any(t[a.prompt] == a.text for v, t in texts.items() if v != a.version):
            mislabeled += 1
    unknown = sum(a.status == 200 and a.version not in texts for a in answers)
    return {"failed": failed, "mislabeled": mislabeled, "unknown_version": unknown}


def _steps(control: RolloutControl, load: Load, candidate: int, promoted_at: float) -> list[dict[str, Any]]:
    """Per canary step: the share of requests without a session the candidate answered, and its χ²."""
    rows = []
    steps = [s for s in control.steps if s.outcome != "promoted" or s.share < 100]
    for i, step in enumerate(steps):
        if step.share >= 100:
            continue
        end = steps[i + 1].activate_at if i + 1 < len(steps) else promoted_at
        plain = [a for a in load.between(step.activate_at + 0.2, end - 0.2) if a.session is None and a.status == 200]
        hits = sum(a.version == candidate for a in plain)
        chi2, p = chi_square(hits, len(plain), step.share) if plain else (float("nan"), float("nan"))
        rows.append({"share": step.share, "requests": len(plain), "candidate": hits,
                     "observed_share": 100 * hits / len(plain) if plain else float("nan"), "chi2": chi2, "p": p})
    return rows


def _sessions_crossing(answers: list[Answer]) -> int:
    seen: dict[str, set[int]] = {}
    for a in answers:
        if a.session is not None and a.status == 200:
            seen.setdefault(a.session, set()).add(a.version)
    return sum(len(v) > 1 for v in seen.values())


class _replicas:
    """N replicas of the base model, stopped on exit."""

    def __init__(self, args: argparse.Namespace, work: Path, env: dict[str, str]) -> None:
        self.args, self.work, self.env = args, work, env
        self._stack: list[Any] = []

    def __enter__(self) -> list[Any]:
        procs = []
        for _ in range(self.args.replicas):
            cm = replica(f"builtin:{self.args.size}-s0", self.work / "logs", threads=self.args.threads, **self.env)
            procs.append(cm.__enter__())
            self._stack.append(cm)
        return procs

    def __exit__(self, *exc: object) -> None:
        for cm in reversed(self._stack):
            cm.__exit__(None, None, None)


def markdown(r: dict[str, Any]) -> str:
    lines = [f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; model {r['size']}, "
             f"{r['replicas']} replicas, {r['clients']} closed-loop clients.", "",
             "| goal | measured |", "|---|---|"]
    if "good" not in r:
        return "\n".join(lines + _shadow_rows(r))
    g = r["good"]
    for b in r["bad"]:
        lines.append(f"| degraded candidate ({b['recipe']} first) rolled back ≤ 30 s, served ≤ 1% | {b['outcome']}, "
                     f"{b['seconds_to_rollback']:.1f} s after its first step, served {b['served_by_candidate']} of "
                     f"{b['answers']} ({100 * b['served_share']:.2f}%); {b['reason']} |")
    path = "→".join(f"{x['share']:g}" for x in g["steps"])
    lines.append(f"| good candidate {path}→100: 0 failed / 0 mislabeled "
                 f"| {g['failed']} failed, {g['mislabeled']} mislabeled of {g['answers']} |")
    for step in [*g["steps"], r["split"]]:
        lines.append(f"| split {step['share']:g}% ± 1 point (χ²) | {step['observed_share']:.2f}% of "
                     f"{step['requests']} requests without a session, χ² {step['chi2']:.2f}, p {step['p']:.2f} |")
    lines.append(f"| 0 sessions see two versions | {g['sessions_two_versions']} of {g['sessions']} sessions |")
    skews = [b["rollback_skew_ms"] for b in r["bad"] if b["rollback_skew_ms"] is not None]
    lines.append(f"| rollback flip skew ≤ 50 ms | {', '.join(f'{x:.1f} ms' for x in skews)} (steps: "
                 f"{', '.join(f'{v:.1f}' for v in g['skew_ms'].values())} ms) |")
    return "\n".join(lines + _shadow_rows(r))


def _shadow_rows(r: dict[str, Any]) -> list[str]:
    if "shadow" not in r:
        return []
    lines = []
    for label, s in ((f"open loop, {r['shadow']['rate_per_s']:.0f} req/s", r["shadow"]),
                     ("closed loop, saturated", r["shadow_saturated"])):
        lines.append(f"| shadow {s['percent']:g}% adds ≤ 5% to served p99 ({label}) | p99 "
                     f"{s['p99_ms_no_rollout']:.0f} → {s['p99_ms_shadow']:.0f} ms ({100 * s['p99_increase']:+.1f}%), "
                     f"p50 {s['p50_ms_no_rollout']:.0f} → {s['p50_ms_shadow']:.0f} ms; {s['compared']} compared, "
                     f"{s['shadow_dropped']} dropped |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["tiny", "mid"])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per replica")
    ap.add_argument("--canary", default="5,25,100")
    ap.add_argument("--step-seconds", type=float, default=5.0)
    ap.add_argument("--min-requests", type=int, default=100)
    ap.add_argument("--split-requests", type=int, default=10_000)
    ap.add_argument("--session-share", type=float, default=0.3)
    ap.add_argument("--shadow", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=20.0, help="seconds per latency window (shadow cost)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating no-rollout / shadow windows")
    ap.add_argument("--load-fraction", type=float, default=0.5,
                    help="open-loop rate for the shadow cost, as a fraction of the closed-loop throughput")
    ap.add_argument("--good-noise", type=float, default=0.1)
    ap.add_argument("--bad-noise", type=float, default=0.5)
    ap.add_argument("--bad-share", type=float, default=1.0)
    ap.add_argument("--phases", nargs="+", default=["shadow", "rollouts"], choices=["shadow", "rollouts"],
                    help="shadow: the shadow's cost alone")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = run(args)
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
