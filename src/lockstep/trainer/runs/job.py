"""Run kind ``job``: the training runs as a Kubernetes Job from a template, on nodes of its own (GPUs), and its
pods publish each checkpoint through the trainer's upload API.

The run creates the Job (``lockstep-<run id>``) in the trainer's namespace and follows it: the Job's state
becomes the run's, each pod's log is copied into ``runs/<id>/logs/``, and every version whose MANIFEST names the
run (``metadata.run_id``) and that was committed is listed in ``record.versions`` (with its ``step`` and ``loss``
as a metric point). Stopping the run deletes the
Job; a Job that fails fails the run with its exit code and the last lines of its log, while the fleet keeps
serving its committed version. A trainer that shuts down leaves the Job running: resuming the run attaches to it
again, or starts a new one from the version the fleet serves when it is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import urllib3

from lockstep.core.errors import LockstepError
from lockstep.core.settings import Settings
from lockstep.store import ModelStore
from lockstep.sync import retention
from lockstep.trainer.jobs import kube, template
from lockstep.trainer.jobs.kube import JobApi
from lockstep.trainer.runs.context import RunContext
from lockstep.trainer.runs.tasks import get_task
from lockstep.trainer.server.publish_jobs import check_ref
from lockstep.trainer.server.schemas import JobParams

log = logging.getLogger(__name__)

POLL_S = 2.0  # seconds between looks at the Job (one GET of the Job and one list of its pods)
LOG_EVERY_S = 10.0  # seconds between copies of the pods' logs while the Job runs
# How long the Kubernetes API may fail (a timeout, a 5xx while etcd elects a leader, a restarting API server)
# before the run gives up on its Job, deletes it and fails.
API_GRACE_S = 120.0
LOG_LINES = 5000  # the last lines of each pod's log kept in the run's folder
ERROR_LOG_LINES = 15  # lines of the failed container's log quoted in the run's error
# A pod waiting for one of these will not start without a change to the template or the cluster.
HOPELESS = {"ErrImageNeverPull", "InvalidImageName", "ImagePullBackOff", "CreateContainerConfigError"}
# What a failing Kubernetes API raises: its refusals (KubeApiError) and, below the client, urllib3's errors
# (timeouts, refused or reset connections; it wraps the socket's). Not OSError: the run's own files raise it.
API_ERRORS: tuple[type[Exception], ...] = (kube.KubeApiError, urllib3.exceptions.HTTPError)


class JobFailed(LockstepError):
    """The run's Job failed or cannot run; the message says why (the fleet keeps its committed version)."""

    status_code = 500
    code = "job_failed"


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def _created(pod: dict[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("creationTimestamp") or "")


def _statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list((pod.get("status") or {}).get("containerStatuses") or [])


def _pod_brief(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod as the run's summary shows it: name, phase, and its containers' exit codes once they ended."""
    status = pod.get("status") or {}
    ended = {s["name"]: s["state"]["terminated"].get("exitCode") for s in _statuses(pod)
             if (s.get("state") or {}).get("terminated")}
    return {"name": pod["metadata"]["name"], "phase": status.get("phase"), "exit_codes": ended}


def _waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    """Why a pod is not running yet, when Kubernetes says (unschedulable, a container waiting): the reason and
    a sentence."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return str(cond.get("reason")), f"{cond.get('reason')}: {cond.get('message')}"
    for s in _statuses(pod):
        waiting = (s.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return waiting["reason"], f"container {s['name']} {waiting['reason']}: {waiting.get('message') or ''}"
    return None


class JobKind:
    """``POST /runs {"kind": "job", "params": {...}}``; ``connect`` gives the Kubernetes API (a fake in tests)."""

    name = "job"
    params_model = JobParams

    def __init__(self, connect: Callable[[Settings], JobApi] = kube.connect, *, poll_s: float = POLL_S,
                 log_every_s: float = LOG_EVERY_S, api_grace_s: float = API_GRACE_S) -> None:
        self._connect = connect
        self._api: JobApi | None = None
        self.poll_s = poll_s
        self.log_every_s = log_every_s
        self.api_grace_s = api_grace_s

    def api(self, settings: Settings) -> JobApi:
        if self._api is None:
            self._api = self._connect(settings)
        return self._api

    def check(self, params: JobParams, settings: Settings, store: ModelStore) -> None:
        """Refuse before a run exists: a bad template or override (400), no Kubernetes API (409)."""
        get_task(params.task)
        if params.model is not None:
            check_ref(params.model, settings, store)
        template.render(template.load(settings, params.template), run_id="check", model="check", params=params)
        self.api(settings)

    # ------------------------------------------------------------------ the run
    def execute(self, ctx: RunContext, params: JobParams) -> None:
        api, namespace = self.api(ctx.settings), kube.namespace(ctx.settings)
        name = template.job_name(ctx.run_id)
        if ctx.record.start_version is None:
            committed = ctx.coordinator.read_state().committed
            ctx.record.start_version = committed.version if committed else 0
        if api.read_job(namespace, name) is not None:
            ctx.progress(ctx.record.progress.step, params.steps, f"attached to job {name} in {namespace}")
        else:
            model = params.model or self._served_model(ctx)
            body = template.render(template.load(ctx.settings, params.template), run_id=ctx.run_id, model=model,
                                   params=params)
            api.create_job(namespace, body)
            ctx.record.summary = {**ctx.record.summary, "model": model}
            ctx.progress(ctx.record.progress.step, params.steps, f"created job {name} in {namespace} from {model}")
        ctx.record.summary = {**ctx.record.summary, "job": name, "namespace": namespace}
        _Follow(ctx, api, namespace, name, params, self.poll_s, self.log_every_s, self.api_grace_s).run()

    @staticmethod
    def _served_model(ctx: RunContext) -> str:
        """What the fleet serves, as a reference a pod can fetch: versions/N from the trainer's store API, or the
        replicas' initial model (v0) as they name it."""
        committed = ctx.coordinator.read_state().committed
        if committed is not None:
            return f"versions/{committed.version}" if committed.version >= 1 else committed.model
        models = {b.serving.model for b in ctx.coordinator.live_replicas()
                  if b.serving is not None and b.serving.version == 0}
        if len(models) > 1:
            raise JobFailed(f"replicas serve different initial models as v0 ({', '.join(sorted(models))}); "
                            "publish one model first, or name it in params.model")
        return models.pop() if models else ctx.settings.initial_model_repo_id


class _Follow:
    """One run's watch over its Job until it ends, fails, or the run is stopped."""

    def __init__(self, ctx: RunContext, api: JobApi, namespace: str, name: str, params: JobParams,
                 poll_s: float, log_every_s: float, api_grace_s: float) -> None:
        self.ctx, self.api, self.namespace, self.name, self.params = ctx, api, namespace, name, params
        self.poll_s, self.log_every_s, self.api_grace_s = poll_s, log_every_s, api_grace_s
        self._api_failing_since: float | None = None
        self.selector = f"{template.RUN_LABEL}={ctx.run_id}"
        self.pods: list[dict[str, Any]] = []
        self.step = ctx.record.progress.step
        self._logs_at = float("-inf")

    def run(self) -> None:
        ctx = self.ctx
        while True:
            try:
                if self._look():
                    return
            except API_ERRORS as exc:
                self._api_failed(exc)
            ctx.stop_event.wait(self.poll_s)

    def _api_failed(self, exc: Exception) -> None:
        """Keep following through a failing API for ``api_grace_s``; then delete the Job (a Job nobody follows
        would train for up to its deadline and publish versions no run tracks) and fail the run."""
        now = time.monotonic()
        if self._api_failing_since is None:
            self._api_failing_since = now
        failing_s = now - self._api_failing_since
        if failing_s < self.api_grace_s:
            log.warning("run %s: the Kubernetes API failed (%s); trying again for %.0f s more", self.ctx.run_id,
                        exc, self.api_grace_s - failing_s)
            self.ctx.progress(self.step, self.params.steps, f"job {self.name}: the Kubernetes API failed, "
                              f"trying again ({str(exc)[:200]})")
            return
        try:
            self.api.delete_job(self.namespace, self.name)
            left = f"job {self.name} was deleted"
        except API_ERRORS:
            left = (f"job {self.name} may still run: delete it (kubectl delete job {self.name} -n "
                    f"{self.namespace})")
        raise JobFailed(f"lost the Kubernetes API for {failing_s:.0f} s following job {self.name} ({exc}); "
                        f"{left}; the versions it published stay") from exc

    def _look(self) -> bool:
        """One look at the Job and its pods; True once it has completed (an error raised once it failed)."""
        ctx = self.ctx
        if ctx.stopping():
            self._stop()
        job = self.api.read_job(self.namespace, self.name)
        if job is None:
            raise JobFailed(f"job {self.name} is gone from namespace {self.namespace} (deleted outside the "
                            f"trainer?); the versions it published stay, start a new run to train on")
        self.pods = sorted(self.api.list_pods(self.namespace, self.selector), key=_created)
        self._attribute()
        if _condition(job, "Complete") is not None:
            self._finish(job)
            return True
        failed = _condition(job, "Failed")
        if failed is not None:
            self._finish(job)
            raise JobFailed(self._failure(failed))
        stuck = [w for p in self.pods if (w := _waiting(p)) is not None and w[0] in HOPELESS]
        if stuck:
            self.api.delete_job(self.namespace, self.name)
            self._finish(job)
            raise JobFailed(f"job {self.name} cannot start: {stuck[0][1].strip()}; fix the template (or "
                            "params.image, params.env) and start a new run")
        if time.monotonic() - self._logs_at >= self.log_every_s:
            self._copy_logs()
        self._api_failing_since = None
        message = self._describe()
        if (self.step, message) != (ctx.record.progress.step, ctx.record.progress.message):
            ctx.progress(self.step, self.params.steps, message)
        return False

    def _stop(self) -> None:
        """A stop deletes the Job; a trainer shutting down leaves it running, to attach to on resume."""
        ctx = self.ctx
        if not ctx.leaving:
            self.pods = sorted(self.api.list_pods(self.namespace, self.selector), key=_created)
            self._copy_logs()
            self.api.delete_job(self.namespace, self.name)
            log.info("run %s stopped: deleted job %s", ctx.run_id, self.name)
            self._settle()
        self._attribute()
        ctx.check_stop()

    def _settle(self) -> None:
        """Wait for a publish of this run that is in flight on the trainer: the run ends with its outcome."""
        deadline = time.monotonic() + self.ctx.settings.stage_timeout_s + 60
        while time.monotonic() < deadline:
            running = self.ctx.publisher.running()
            if running is None or running.run_id != self.ctx.run_id:
                return
            self.ctx.clock.sleep(0.2)

    def _finish(self, job: dict[str, Any]) -> None:
        """Last look: every pod's log, every version it published, the Job's counts in the summary."""
        self._copy_logs()
        self._attribute()
        status = job.get("status") or {}
        self.ctx.record.summary = {**self.ctx.record.summary, "pods": [_pod_brief(p) for p in self.pods],
                                   "succeeded": status.get("succeeded", 0), "failed": status.get("failed", 0),
                                   "versions": list(self.ctx.record.versions)}
        self.ctx.save()

    def _attribute(self) -> None:
        """List the committed versions whose MANIFEST names this run, in order, once each."""
        ctx, record = self.ctx, self.ctx.record
        store = ctx.coordinator.store
        if store is None:
            return
        manifests = [m for m in store.list()
                     if m.metadata.get("run_id") == ctx.run_id and m.version not in record.versions]
        if not manifests:
            return
        committed = ctx.coordinator.read_state().committed
        outcomes = retention.read_outcomes(ctx.coordinator.data_dir / "history", [m.version for m in manifests],
                                           committed.version if committed else None)
        added = [m for m in manifests if outcomes.by_version.get(m.version) == "committed"]
        for manifest in added:
            record.versions.append(manifest.version)
            step, loss = manifest.metadata.get("step"), manifest.metadata.get("loss")
            if isinstance(step, int) and not isinstance(step, bool):
                self.step = max(self.step, step)
                # The training curve, a point per version: what the publish callback put in the MANIFEST.
                ctx.metric({"type": "step", "step": step, "version": manifest.version,
                            "loss": loss if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None})
            log.info("run %s: job %s published v%d", ctx.run_id, self.name, manifest.version)
        if added:
            ctx.save()

    def _copy_logs(self) -> None:
        """Each pod's log (its last LOG_LINES lines) into ``runs/<id>/logs/<pod>.log``; a pod already gone
        keeps the copy made earlier."""
        self._logs_at = time.monotonic()
        for pod in self.pods:
            container = pod["spec"]["containers"][0]["name"]
            text = self.api.pod_log(self.namespace, pod["metadata"]["name"], container, LOG_LINES)
            if text:
                self.ctx.files.write_log(pod["metadata"]["name"], text)

    def _describe(self) -> str:
        """The progress message: the newest pod's state and what was published so far."""
        versions = self.ctx.record.versions
        published = f"; {len(versions)} published, last v{versions[-1]}" if versions else ""
        if not self.pods:
            return f"job {self.name}: waiting for its pod{published}"
        pod = self.pods[-1]
        why = _waiting(pod)
        phase = (pod.get("status") or {}).get("phase") or "Pending"
        return f"job {self.name}: pod {pod['metadata']['name']} {phase}{f' ({why[1]})' if why else ''}{published}"

    def _failure(self, condition: dict[str, Any]) -> str:
        """Why the Job failed: its condition, the last failed container's exit code and the end of its log."""
        head = f"job {self.name} failed ({condition.get('reason')}: {condition.get('message')})"
        for pod in reversed(self.pods):
            for s in _statuses(pod):
                ended = (s.get("state") or {}).get("terminated") or (s.get("lastState") or {}).get("terminated")
                if ended and ended.get("exitCode") not in (None, 0):
                    logs = self.ctx.files.logs()
                    tail = logs.get(pod["metadata"]["name"], "").rstrip("\n").splitlines()[-ERROR_LOG_LINES:]
                    reason = f" ({ended['reason']})" if ended.get("reason") else ""
                    last = "\n".join(tail) if tail else "(no log)"
                    return (f"{head}: pod {pod['metadata']['name']}: container {s['name']} exited "
                            f"{ended['exitCode']}{reason}; last lines of its log:\n{last}")
        return head
