"""Run kind ``simulation`` (the seed's): switch the cluster between two models, round after round, through the
sync protocol, and check each time that every replica converged and that answers name the new version.

Per round: propagation time (publish start → the last replica serving the new version), skew (the spread of
the replicas' ``serving.since``), requests that failed, answers whose header and body disagree or that name
the wrong version, and errors.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from lockstep.core.settings import Settings
from lockstep.models import loader
from lockstep.store import ModelStore, content_digest, scan_dir
from lockstep.sync.protocol import Heartbeat
from lockstep.trainer.runs.context import RunContext
from lockstep.trainer.runs.rollouts import GenRequest, Rollout, RolloutClient
from lockstep.trainer.server.publish_jobs import check_ref
from lockstep.trainer.server.schemas import SimulationParams

log = logging.getLogger(__name__)

PROMPTS = ("The capital of France is", "Count with me: one, two,", "Once upon a time", "Colours of the sky:")
LATE_AFTER_S = 0.5  # seconds after activate_at: an old-version answer sent later than this is counted as late


class _Load:
    """Requests to every replica in turn while a switch happens (none may fail)."""

    def __init__(self, client: RolloutClient, urls: list[str], max_new_tokens: int) -> None:
        self.client = client
        self.urls = urls
        self.max_new_tokens = max_new_tokens
        self.results: list[Rollout] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulation-load", daemon=True)

    def __enter__(self) -> _Load:
        if self.urls:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=120)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            request = GenRequest(prompt, self.max_new_tokens, 0.0)
            self.results.extend(self.client.on_each(self.urls, [request]))
            i += 1


def _skew(beats: list[Heartbeat], version: int) -> float | None:
    since = [b.serving.since for b in beats if b.serving and b.serving.version == version and b.serving.since]
    return round(max(since) - min(since), 6) if len(since) >= 2 else (0.0 if since else None)


class SimulationKind:
    """``POST /runs {"kind": "simulation", "params": {...}}``."""

    name = "simulation"
    params_model = SimulationParams

    def check(self, params: SimulationParams, settings: Settings, store: ModelStore) -> None:
        check_ref(params.initial_model or settings.initial_model, settings, store)
        check_ref(params.substitute_model or settings.substitute_model, settings, store)

    def execute(self, ctx: RunContext, params: SimulationParams) -> None:
        models = self._order(ctx, params.initial_model or ctx.settings.initial_model,
                             params.substitute_model or ctx.settings.substitute_model)
        done = [m for m in ctx.files.metrics() if m.get("type") == "round"]
        first = max((int(m["round"]) for m in done), default=0) + 1  # a resumed run goes on after it
        client = RolloutClient(lambda: [])
        totals = {"failed": 0, "mislabeled": 0, "late": 0, "converged": 0}
        skews: list[float] = []
        propagations: list[float] = []
        try:
            for rnd in range(first, params.rounds + 1):
                ctx.check_stop()
                target = models[(rnd - first) % 2]
                ctx.progress(rnd - 1, params.rounds, f"round {rnd}/{params.rounds}: switching to {target}")
                row = self._round(ctx, params, client, rnd, target)
                ctx.metric(row)
                for key in ("failed", "mislabeled", "late"):
                    totals[key] += int(row[key])
                totals["converged"] += int(bool(row["converged"]))
                if row["skew_s"] is not None:
                    skews.append(row["skew_s"])
                if row["propagation_s"] is not None:
                    propagations.append(row["propagation_s"])
                if params.interval_s and rnd < params.rounds:
                    deadline = time.monotonic() + params.interval_s
                    while time.monotonic() < deadline:
                        ctx.check_stop()
                        ctx.clock.sleep(min(0.2, deadline - time.monotonic()))
        finally:
            client.close()
        ctx.progress(params.rounds, params.rounds, "done")
        ctx.record.summary = {**totals, "rounds": params.rounds, "max_skew_s": max(skews, default=None),
                              "mean_propagation_s": (sum(propagations) / len(propagations)) if propagations
                              else None, "versions": list(ctx.record.versions)}

    @staticmethod
    def _order(ctx: RunContext, initial: str, substitute: str) -> tuple[str, str]:
        """Round 1 switches to the substitute, round 2 back, ...; when the cluster already serves the
        substitute's content, round 1 switches to the initial model instead (every round is a real switch)."""
        committed = ctx.coordinator.read_state().committed
        if committed is None or committed.digest is None:
            return substitute, initial
        path = loader.resolve(substitute, ctx.settings, ctx.coordinator.store).path
        same = content_digest(scan_dir(path)) == committed.digest
        return (initial, substitute) if same else (substitute, initial)

    def _round(self, ctx: RunContext, p: SimulationParams, client: RolloutClient, rnd: int,
               target: str) -> dict[str, Any]:
        before = ctx.cluster.snapshot(probe=False, discover=True)
        urls = before.ready_urls()
        old_version = before.committed_version
        errors: list[str] = []
        started = ctx.clock.time()
        result = None
        with _Load(client, urls if p.background_load else [], p.max_new_tokens) as load:
            try:
                result = ctx.publisher.publish_ref(target, run_id=ctx.run_id, policy=p.policy,
                                                   timeout_s=p.timeout_s,
                                                   metadata={"run_id": ctx.run_id, "round": rnd})
            except Exception as exc:  # a refused publish is this round's result, not the run's end
                errors.append(f"publish failed: {exc}")
            version = result.version if result is not None and result.ok else old_version
            converged, beats = self._converge(ctx, version, p.converge_timeout_s)
        if result is not None and result.ok and result.version not in ctx.record.versions:
            ctx.record.versions.append(result.version)
            ctx.save()
        if result is not None and not result.ok:
            errors.append(f"v{result.version} {result.outcome}: {result.reason}")
        # After convergence every replica must answer with the new version.
        after = ctx.cluster.snapshot(probe=False, discover=True).ready_urls()
        prompts = [GenRequest(PROMPTS[i % len(PROMPTS)], p.max_new_tokens, 0.0)
                   for i in range(p.requests_per_replica)]
        checks = client.on_each(after, prompts) if prompts else []
        activate_at = result.activate_at if result is not None else None
        failed = [r for r in load.results + checks if not r.ok]
        mislabeled = [r for r in load.results if r.mislabeled] + [r for r in checks if r.ok and (
            r.mislabeled or r.version != version)]
        late = [r for r in load.results if r.ok and activate_at is not None and r.version == old_version
                and version != old_version and r.started_at > activate_at + LATE_AFTER_S]
        errors += [f"{r.url}: {r.error}" for r in failed[:5]]
        errors += [f"{r.replica_id}: answered as v{r.version} (body v{r.body_version}), expected v{version}"
                   for r in mislabeled[:5]]
        since = [b.serving.since for b in beats
                 if b.serving and b.serving.version == version and b.serving.since]
        propagation = round(max(since) - started, 6) if since and version != old_version else None
        for r in checks[:: max(1, len(prompts))]:  # the first answer of each replica
            ctx.sample({"version": r.version, "round": rnd, "prompt": r.request.prompt, "answer": r.text,
                        "replica_id": r.replica_id})
        return {"type": "round", "round": rnd, "step": rnd, "model": target, "version": version,
                "from_version": old_version, "outcome": result.outcome if result is not None else "failed",
                "converged": converged, "replicas": len(beats), "propagation_s": propagation,
                "skew_s": _skew(beats, version), "prepare_s": round(result.prepare_s, 6) if result else None,
                "publish_s": round(result.total_s, 6) if result else None,
                "requests": len(load.results) + len(checks), "failed": len(failed),
                "mislabeled": len(mislabeled), "late": len(late), "errors": errors}

    @staticmethod
    def _converge(ctx: RunContext, version: int, timeout_s: float) -> tuple[bool, list[Heartbeat]]:
        """Poll heartbeats until every live replica serves ``version`` and is ready (or time runs out)."""
        deadline = time.monotonic() + timeout_s
        while True:
            beats = ctx.coordinator.live_replicas()
            if beats and all(b.ready and b.serving and b.serving.version == version for b in beats):
                return True, beats
            if time.monotonic() >= deadline:
                return False, beats
            ctx.clock.sleep(ctx.settings.poll_interval_s)
