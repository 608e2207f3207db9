"""Job templates: a ``batch/v1`` Job in YAML (k8s/training/job.yaml), checked, then filled in for one run.

A template is refused (400, naming the problem) unless it is one Job whose pod template carries the label
``lockstep/publisher: "true"``: the trainer's NetworkPolicy admits only such pods to its upload API, so a Job
without it would train and then fail to publish anything.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from lockstep.core.errors import BadRequest, Conflict
from lockstep.core.settings import Settings
from lockstep.trainer.server.schemas import JobParams

PUBLISHER_LABEL = "lockstep/publisher"  # the NetworkPolicy's key to the trainer's upload port
RUN_LABEL = "lockstep/run-id"  # on the Job and its pods: which run they belong to
MANAGED_BY = "lockstep-trainer"
MAX_TEMPLATE_BYTES = 256 * 1024


def job_name(run_id: str) -> str:
    """The Job of a run: ``lockstep-<run id>`` (run ids are lower-case, digits and '-': a valid name)."""
    return f"lockstep-{run_id}"[:63].rstrip("-")


def template_path(settings: Settings, name: str) -> Path:
    """Where template ``name`` lives; 409 when the trainer has no template folder."""
    if settings.job_template_dir is None:
        raise Conflict("job runs are not set up on this trainer: LOCKSTEP_JOB_TEMPLATE_DIR names no folder of Job "
                       "templates (in Kubernetes, the ConfigMap trainer-job-templates mounted at /etc/lockstep/jobs)")
    return settings.job_template_dir / f"{name}.yaml"


def load(settings: Settings, name: str) -> dict[str, Any]:
    """Read and check template ``name`` (400 when it is missing, unreadable or not a publishing Job)."""
    path = template_path(settings, name)
    try:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise BadRequest(f"job template {path} is over {MAX_TEMPLATE_BYTES // 1024} KiB; is it a Job?")
        text = path.read_text()
    except FileNotFoundError:
        folder = path.parent
        names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise BadRequest(f"no job template {name!r} in {folder} (params.template names <template>.yaml there); "
                         f"templates: {', '.join(names) or 'none'}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"job template {path} cannot be read: {exc}") from exc
    return parse(text, str(path))


def parse(text: str, where: str) -> dict[str, Any]:
    """One checked Job from YAML text; ``where`` names it in errors."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise BadRequest(f"job template {where} does not parse as YAML: {exc}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise BadRequest(f"job template {where} is nested too deeply to be a Job") from None
    if len(docs) != 1:
        raise BadRequest(f"job template {where} holds {len(docs)} YAML documents; it must be exactly one Job")
    check(docs[0], where)
    job: dict[str, Any] = docs[0]
    return job


def _mapping(value: Any, path: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"job template {where}: {path} is missing or not a mapping")
    return value


def check(job: Any, where: str) -> None:
    """400 unless ``job`` is a batch/v1 Job whose pods carry the publisher label and can run to completion."""
    if not isinstance(job, dict) or job.get("apiVersion") != "batch/v1" or job.get("kind") != "Job":
        what = f"{job.get('apiVersion')} {job.get('kind')}" if isinstance(job, dict) else type(job).__name__
        raise BadRequest(f"job template {where} is a {what}, not a batch/v1 Job")
    if "metadata" in job and not isinstance(job["metadata"], dict):
        raise BadRequest(f"job template {where}: metadata is not a mapping")
    if (job.get("metadata") or {}).get("labels") is not None:
        _mapping(job["metadata"]["labels"], "metadata.labels", where)  # the run's labels are added to them
    template = _mapping(_mapping(job.get("spec"), "spec", where).get("template"), "spec.template", where)
    pod_metadata = _mapping(template.get("metadata") or {}, "spec.template.metadata", where)
    labels = _mapping(pod_metadata.get("labels") or {}, "spec.template.metadata.labels", where)
    if labels.get(PUBLISHER_LABEL) != "true":
        raise BadRequest(f'job template {where}: its pods lack the label {PUBLISHER_LABEL}: "true" '
                         "(spec.template.metadata.labels); without it the trainer's NetworkPolicy keeps them "
                         "from the upload API, so nothing they train is published")
    spec = _mapping(template.get("spec"), "spec.template.spec", where)
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers or not all(
            isinstance(c, dict) and c.get("name") and c.get("image") for c in containers):
        raise BadRequest(f"job template {where}: spec.template.spec.containers must list at least one container, "
                         "each with a name and an image (the first one trains)")
    if not isinstance(containers[0].get("env") or [], list):  # the run's environment is added to it
        raise BadRequest(f"job template {where}: spec.template.spec.containers[0].env is not a list")
    if spec.get("restartPolicy") not in ("Never", "OnFailure"):
        raise BadRequest(f"job template {where}: spec.template.spec.restartPolicy is "
                         f"{spec.get('restartPolicy')!r}; a Job's pods need Never or OnFailure")


def run_env(run_id: str, model: str, params: JobParams) -> dict[str, str]:
    """What the trainer tells a job's first container about its run (schemas.JOB_ENV)."""
    return {"LOCKSTEP_RUN_ID": run_id, "LOCKSTEP_JOB_MODEL": model, "LOCKSTEP_JOB_TASK": params.task,
            "LOCKSTEP_JOB_STEPS": str(params.steps), "LOCKSTEP_JOB_SAVE_STEPS": str(params.save_steps),
            "LOCKSTEP_JOB_LEARNING_RATE": repr(params.learning_rate),
            "LOCKSTEP_JOB_BATCH_SIZE": str(params.batch_size)}


def render(template: dict[str, Any], *, run_id: str, model: str, params: JobParams) -> dict[str, Any]:
    """The Job of one run: the template named and labelled for it, with the run's overrides and environment."""
    job = copy.deepcopy(template)
    meta = job.setdefault("metadata", {})
    for key in ("namespace", "generateName", "resourceVersion", "uid"):
        meta.pop(key, None)  # the trainer's namespace, this run's name
    meta["name"] = job_name(run_id)
    meta["labels"] = {**(meta.get("labels") or {}), RUN_LABEL: run_id, "app.kubernetes.io/managed-by": MANAGED_BY}
    spec = job["spec"]
    if params.backoff_limit is not None:
        spec["backoffLimit"] = params.backoff_limit
    if params.deadline_s is not None:
        spec["activeDeadlineSeconds"] = params.deadline_s
    pod = spec["template"]
    pod["metadata"] = {**pod.get("metadata", {}), "labels": {**pod["metadata"]["labels"], RUN_LABEL: run_id}}
    container = pod["spec"]["containers"][0]
    if params.image is not None:
        container["image"] = params.image
    if params.command is not None:
        container["command"] = list(params.command)
    if params.args is not None:
        container["args"] = list(params.args)
    added = {**params.env, **run_env(run_id, model, params)}
    kept = [e for e in container.get("env") or [] if not (isinstance(e, dict) and e.get("name") in added)]
    container["env"] = kept + [{"name": k, "value": v} for k, v in added.items()]
    return job
