"""The trainer's publish, rollback and cluster API from a script or the CLI (clusters without a shared folder)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

import httpx

from lockstep.core.errors import BadModelRef, Conflict, LockstepError, NotReady
from lockstep.core.http import bearer_headers
from lockstep.store.chunks import cut_file
from lockstep.store.manifest import Progress, check_model_dir
from lockstep.sync.coordinator import PublishResult, ReplicaReport
from lockstep.trainer.client.model_files import model_files

POLL_S = 0.5  # seconds between looks at a running publish job


class TrainerClient:
    """``publish``/``rollback`` through the trainer (which runs the two phases) and its ``cluster`` view."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=bearer_headers(token), timeout=timeout_s)
        self.bytes_sent = 0  # chunk bytes the last upload sent (the trainer's store had the rest)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TrainerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise NotReady(f"cannot reach the trainer at {self.url} ({exc}); check --trainer / TRAINER_URL and "
                              "that the trainer is running") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", {}).get("message") or response.text
            except ValueError:
                detail = response.text
            raise LockstepError(f"the trainer answered {response.status_code} to {method} {path}: {detail}")
        return response.json()

    def cluster(self) -> dict[str, Any]:
        """``GET /cluster``: committed version, pending phase and every replica the trainer sees."""
        result: dict[str, Any] = self._call("GET", "/cluster")
        return result

    def publish(self, model: str, *, policy: str | None = None, timeout_s: float | None = None,
                rollout: dict[str, Any] | None = None) -> PublishResult:
        """Publish ``model`` through the trainer and wait for the outcome.

        ``rollout``: ``canary`` (shares, like [5, 25, 100]), ``step_seconds``, ``min_requests``, ``shadow`` and
        ``gates`` (docs/api.md, Rollouts): staged everywhere, then given its shares step by step."""
        body = {k: v for k, v in {"model": model, "policy": policy, "timeout_s": timeout_s}.items() if v is not None}
        body.update({k: v for k, v in (rollout or {}).items() if v is not None})
        return self._wait(self._call("POST", "/publish", json=body)["publish_id"])

    def rollout(self) -> dict[str, Any]:
        """``GET /rollout``: the rollout in progress, or the last one (steps, shares, gates)."""
        view: dict[str, Any] = self._call("GET", "/rollout")
        return view

    def promote(self) -> dict[str, Any]:
        """Promote the rollout in progress now; a person's call wins over the gates."""
        view: dict[str, Any] = self._call("POST", "/rollout/promote")
        return view

    def abort_rollout(self) -> dict[str, Any]:
        """Roll the rollout in progress back now."""
        view: dict[str, Any] = self._call("POST", "/rollout/abort")
        return view

    def publish_folder(self, folder: str | Path, *, label: str | None = None, metadata: dict[str, Any] | None = None,
                       policy: str | None = None, timeout_s: float | None = None,
                       progress: Progress | None = None, rollout: dict[str, Any] | None = None) -> PublishResult:
        """Upload a local model folder's model files and publish them as the next version.

        For a trainer that cannot see the folder: another machine, no shared volume. A folder with safetensors
        weights sends only what a replica loads (config, weights, tokenizer): a Trainer checkpoint's optimizer,
        scheduler and RNG state stay here (they are pickles the trainer refuses, and the bulk of the bytes). The
        trainer checks each file's sha256, copies the upload into its store and removes it; ``progress(sent,
        total)`` follows the upload; ``rollout``: as for ``publish``."""
        folder = Path(folder)
        check_model_dir(folder, allow_pickle=True)  # not a model: refused before any byte is sent
        files = model_files(folder)
        upload_id = self.upload(folder, progress=progress,
                                files=files if any(f.endswith(".safetensors") for f in files) else None)
        body = {k: v for k, v in {"label": label or str(Path(folder).resolve()), "metadata": metadata,
                                  "policy": policy, "timeout_s": timeout_s}.items() if v is not None}
        body.update({k: v for k, v in (rollout or {}).items() if v is not None})
        try:
            job = self._call("POST", f"/store/uploads/{upload_id}/publish", json=body)
        except LockstepError:
            # Refused (another publish runs, say): drop the upload, which would hold one of the trainer's few
            # open-upload places for 24 h.
            with contextlib.suppress(LockstepError, ValueError):  # 204: no JSON body
                self._call("DELETE", f"/store/uploads/{upload_id}")
            raise
        return self._wait(job["publish_id"])

    def upload(self, folder: str | Path, *, progress: Progress | None = None, files: list[str] | None = None) -> str:
        """Send ``folder`` to the trainer: each file as its chunks, and only the chunks its store lacks (a
        fine-tuned checkpoint crosses the network as its changed tensors); the upload's id.

        ``progress(done, total)`` counts the bytes the trainer has, sent now or already in its store; ``files``:
        the paths (relative to ``folder``) to send, by default every file under it."""
        folder = Path(folder)
        if not folder.is_dir():
            raise BadModelRef(f"{folder} is not a folder")
        names = sorted(files if files is not None
                       else (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()))
        total = sum((folder / n).stat().st_size for n in names)
        upload_id: str = self._call("POST", "/store/uploads")["upload_id"]
        done = 0
        self.bytes_sent = 0
        try:
            for name in names:
                self._upload_file(upload_id, folder / name, name)
                done += (folder / name).stat().st_size
                if progress is not None:
                    progress(done, total)
        except BaseException:
            with contextlib.suppress(LockstepError, ValueError):  # 204: no JSON body
                self._call("DELETE", f"/store/uploads/{upload_id}")
            raise
        return upload_id

    def _upload_file(self, upload_id: str, path: Path, name: str) -> None:
        """One file: its chunk list, then the chunks the trainer asks for, then the list again."""
        digest = hashlib.sha256()
        chunks = []
        for chunk, data in cut_file(path):
            digest.update(data)
            chunks.append(chunk)
        body = {"size": sum(c.size for c in chunks), "sha256": digest.hexdigest(),
                "chunks": [c.model_dump() for c in chunks]}
        by_sha = {c.sha256: c for c in chunks}
        for _ in range(3):  # a chunk the trainer's garbage collection took meanwhile is asked for again
            missing = self._call("PUT", f"/store/uploads/{upload_id}/chunked/{name}", json=body)["missing"]
            if not missing:
                return
            with path.open("rb") as f:
                for sha in missing:
                    chunk = by_sha.get(sha)
                    if chunk is None:
                        raise LockstepError(f"the trainer asked for chunk {sha[:12]}, which {name} does not have")
                    f.seek(chunk.offset)
                    data = f.read(chunk.size)
                    self._call("PUT", f"/store/uploads/{upload_id}/chunks/{sha}", content=data,
                               headers={"Content-Type": "application/octet-stream"})
                    self.bytes_sent += len(data)
        raise LockstepError(f"the trainer kept asking for chunks of {name}; check its disk and try again")

    def wait_until_serving(self, version: int, *, timeout_s: float = 60.0,
                           min_replicas: int = 1) -> list[dict[str, Any]]:
        """Block until every live replica the trainer sees (at least ``min_replicas``) serves ``version``
        and is ready; their views from ``GET /cluster``."""
        deadline = time.monotonic() + timeout_s
        while True:
            live = [r for r in self.cluster()["replicas"] if r["live"]]
            if len(live) >= min_replicas and all(r["ready"] and r["serving_version"] == version for r in live):
                return live
            if time.monotonic() >= deadline:
                have = ", ".join(f"{r['replica_id']}=v{r['serving_version']}" for r in live) or "none"
                raise Conflict(f"replicas did not all serve v{version} within {timeout_s:.0f}s (live: {have})")
            time.sleep(POLL_S / 5)

    def rollback(self, to: int | None = None) -> PublishResult:
        """Commit an earlier version again (default: the one before the committed one) and wait."""
        return self._wait(self._call("POST", "/rollback", json={"to": to} if to is not None else {})["publish_id"])

    def _wait(self, publish_id: str) -> PublishResult:
        while True:
            job = self._call("GET", f"/publishes/{publish_id}")
            if job["status"] == "failed":
                raise LockstepError(f"publish {publish_id} failed on the trainer: {job.get('error')}")
            if job["status"] == "done":
                return result_from_dict(job["result"])
            time.sleep(POLL_S)


def result_from_dict(data: dict[str, Any]) -> PublishResult:
    """A ``PublishResult`` from its ``as_dict()`` form (the trainer's publish job result)."""
    fields = {k: data[k] for k in ("version", "model", "outcome", "reason", "activate_at", "started_at",
                                   "prepare_s", "total_s", "generation", "rollback", "rollout")
              if data.get(k) is not None}
    replicas = [ReplicaReport(**r) for r in data.get("replicas") or []]
    return PublishResult(**fields, replicas=replicas)
