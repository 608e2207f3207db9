"""Everything a running replica does besides answering requests: boot, updates, sync, heartbeats."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import BadModelRef, BadRequest, Conflict, NotFound
from lockstep.core.http import bearer_headers
from lockstep.core.settings import Settings
from lockstep.inference.generation import TokenRate
from lockstep.inference.replica import EngineFactory, Replica
from lockstep.models.loader import check_available, check_safe_files
from lockstep.models.refs import ModelRef, RefKind, parse_ref
from lockstep.store import ModelStore, VersionSource
from lockstep.store.remote import RemoteStore
from lockstep.store.version_cache import FolderOrigin, VersionCache
from lockstep.sync.agent import Abort, Rules, Transport
from lockstep.sync.protocol import Committed, Pending, Phase, ReplicaStatus, Split, StageState
from lockstep.sync.replica_agent import ReplicaAgent
from lockstep.sync.tolerant import url_problem
from lockstep.sync.watcher import SyncWatcher, heartbeat_of

log = logging.getLogger(__name__)

COMMITTED_POLL_S = 5.0  # a replica without a shared folder asks the trainer for the committed version this often
UNTOLD_GRACE_S = 30.0  # a commit not pushed to it within this long was never going to be (see _watch_committed)


def default_replica_id(settings: Settings, port: int | None = None) -> str:
    if settings.replica_id:
        return settings.replica_id
    return f"{socket.gethostname()}-{port or os.getpid()}"


def versions_dir(settings: Settings, replica_id: str) -> Path:
    """Where this replica assembles versions: its own local folder (on a shared HF_HOME it would share copies)."""
    if settings.versions_dir is not None:
        return settings.versions_dir
    if settings.shared_dir is None:
        return settings.hf_home_path / "lockstep-versions"
    return Path(tempfile.gettempdir()) / "lockstep-versions" / re.sub(r"[^A-Za-z0-9._-]", "_", replica_id)


class ReplicaRuntime:
    """A replica with its identity, its updates (local, HTTP two-phase, or shared-folder sync)."""

    def __init__(self, settings: Settings, *, replica: Replica | None = None, clock: Clock = SYSTEM_CLOCK,
                 engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.store: VersionSource | None = None
        shared = ModelStore(settings.shared_dir, clock=clock) if settings.shared_dir is not None else None
        self.replica_id = settings.replica_id or default_replica_id(settings)
        cache_dir = versions_dir(settings, self.replica_id)
        if shared is not None:
            # Versions stored as chunks are assembled on local disk from this replica's copies and the shared folder.
            self.store = VersionCache(FolderOrigin(shared), cache_dir, keep=settings.keep_versions,
                                      token=settings.api_token)
        elif settings.coordinator_url:
            # No shared volume: versions/N come from the trainer and from peers, verified into a local cache.
            self.store = RemoteStore(settings.coordinator_url, cache_dir, token=settings.api_token,
                                     keep=settings.keep_versions)
        self.replica = replica or Replica(settings, store=self.store, clock=clock, engine_factory=engine_factory)
        self.url = settings.advertise_url
        self.token_rate = TokenRate()
        self._update_lock = threading.Lock()  # one update at a time on a standalone replica
        self._update_thread: threading.Thread | None = None
        self._local_version = 0
        # The trainer's /admin/stage, /admin/commit and /admin/abort, fed to the agent the shared folder uses.
        self.agent = ReplicaAgent(self.replica, Rules(Transport.HTTP, settings.initial_model_repo_id), clock,
                                  self.replica_id, beat=lambda: None, wake=lambda: self.agent.step())
        self.watcher: SyncWatcher | None = None
        if shared is not None:
            self.watcher = SyncWatcher(self.replica, settings, store=shared, clock=clock,
                                       replica_id=self.replica_id, url=self.url, token_rate=self.token_rate)
        self._stopping = threading.Event()
        self.started_at = clock.time()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Boot in the background (so /healthz answers while the model loads)."""
        if self.watcher is not None:
            self.watcher.start()  # boots into the committed version (or the initial model as v0)
        elif self.replica.serving is None:
            threading.Thread(target=self._boot_standalone, name="boot", daemon=True).start()

    def _boot_standalone(self) -> None:
        model, version, digest = self.settings.initial_model_repo_id, 0, None
        if self.settings.coordinator_url:
            committed = self._ask_committed()
            if committed is None:
                return  # stopped before the trainer answered
            if committed.get("version"):
                model, version, digest = str(committed["model"]), int(committed["version"]), committed.get("digest")
                self._suggest_peers(version, committed.get("peers"))
            self.replica.set_committed(version, digest)  # unready until it serves exactly this
        try:
            self.replica.boot(model, version, digest)
        except Exception as exc:  # recorded in /status; the process stays up to report it
            log.error("boot failed: %s", exc)
        if self.settings.coordinator_url:
            self._watch_committed(version)

    def _ask_committed(self) -> dict[str, Any] | None:
        """The trainer's committed version (GET /sync/committed); retried, unready, until it answers."""
        wait = 0.5
        while not self._stopping.is_set():
            committed = self._fetch_committed()
            if isinstance(committed, dict):
                self.replica.last_error = None
                log.info("the trainer's committed version: v%s (%s)", committed.get("version", 0),
                         committed.get("model") or "the initial model")
                return committed
            self.replica.last_error = (f"waiting for the trainer at {self.settings.coordinator_url} to say which "
                                       f"version is committed: {committed}")
            log.warning("%s; unready, retrying in %.1fs", self.replica.last_error, wait)
            self._stopping.wait(wait)
            wait = min(5.0, wait * 2)
        return None

    def _fetch_committed(self) -> dict[str, Any] | str:
        """One GET /sync/committed: the committed version (``version`` 0 for the initial model) and the peers
        that hold it; or what went wrong."""
        url = f"{str(self.settings.coordinator_url).rstrip('/')}/sync/committed"
        try:
            response = httpx.get(url, headers=bearer_headers(self.settings.api_token), timeout=10.0)
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.text[:200]}"
            answer = response.json()
            return {"version": 0, **(answer.get("committed") or {}), "peers": answer.get("peers") or []}
        except (httpx.HTTPError, ValueError, AttributeError, TypeError) as exc:
            return str(exc) or type(exc).__name__

    def _watch_committed(self, trainer_version: int) -> None:
        """Catch up with commits the trainer never told this replica of.

        A trainer pushes each commit to the replicas it drives, before the commit's moment. One it does not drive
        (missing from INFERENCE_URLS, not found by discovery) would stay ready on an old version for good. So the
        replica asks every ``COMMITTED_POLL_S``; a new commit of the trainer's (``trainer_version``: the last one
        it knows of) that it has not been told of for ``UNTOLD_GRACE_S`` (far longer than any push takes) makes it
        unready, says why, and loads that version. Only a change on the trainer's side counts: an
        ``/update-model`` of this replica alone, or a ``lockstep publish --urls`` naming it, moves it on purpose.
        """
        untold_since: float | None = None
        while not self._stopping.wait(COMMITTED_POLL_S):
            committed = self._fetch_committed()
            if not isinstance(committed, dict):
                continue  # the trainer is away: nothing new to learn, keep serving what was committed
            try:
                version = int(committed["version"])
            except (TypeError, ValueError):
                continue
            if version in (trainer_version, self.replica.committed_version):
                trainer_version, untold_since = version, None  # nothing new, or told of it
                continue
            now = self.clock.monotonic()
            untold_since = now if untold_since is None else untold_since
            if now - untold_since < UNTOLD_GRACE_S:
                continue
            model = str(committed.get("model") or self.settings.initial_model_repo_id)
            digest = committed.get("digest") if isinstance(committed.get("digest"), str) else None
            reason = (f"the trainer committed v{version} and never told this replica (it drives only the replicas "
                      "in its INFERENCE_URLS or found by discovery: list this one there); unready, loading "
                      f"v{version}")
            log.warning("%s", reason)
            self.replica.last_error = reason
            self.replica.set_committed(version, digest)  # unready until it serves exactly that
            trainer_version, untold_since = version, None
            try:
                self.replica.boot(model, version, digest)
            except Exception as exc:  # recorded in /status; unready until a later commit reaches it
                log.error("catching up with v%d failed: %s", version, exc)

    def stop(self) -> None:
        self._stopping.set()
        if self.watcher is not None:
            self.watcher.stop()
        self.replica.close()

    # ------------------------------------------------------------------ updates
    def start_update(self, model_ref: str) -> dict[str, Any]:
        """POST /update-model: a cluster-wide publish with a shared folder, else stage and flip this replica."""
        ref = self._precheck(model_ref)
        if self.watcher is not None:
            # The publish runs in the background, where a missing model shows only in the log: the caller gets
            # the 404/400 now (this handler runs in a worker thread, so the folder walk keeps off the event loop).
            check_available(ref, self.settings, self.store)
            return self.watcher.start_publish(ref.raw, origin=f"POST /update-model on {self.replica_id}")
        with self._update_lock:
            if self._update_thread is not None and self._update_thread.is_alive():
                info = self.replica.stage_info
                doing = f"v{info.version} ({info.model})" if info else "an update"
                raise Conflict(f"{doing} is still loading; retry when GET /status shows it finished")
            version = max(self._local_version, self.replica.serving.version if self.replica.serving else 0) + 1
            self._local_version = version
            thread = threading.Thread(target=self._local_update, args=(ref.raw, version), name=f"update-v{version}",
                                      daemon=True)
            self._update_thread = thread
            thread.start()
        return {"status": "accepted", "scope": "replica", "model": ref.raw, "version": version,
                "replica_id": self.replica_id}

    def _precheck(self, model_ref: str) -> ModelRef:
        """A 400 before anything starts: malformed references, and local folders that are unsafe to load."""
        ref = parse_ref(model_ref)
        if ref.kind is RefKind.VERSION and self.store is None:
            raise BadModelRef(f"{ref.raw!r} names a published version but this replica has no shared folder "
                              "(LOCKSTEP_SHARED_DIR) and no trainer to download it from (LOCKSTEP_COORDINATOR_URL); "
                              "name a repo id, a directory or a builtin model instead")
        if ref.kind is RefKind.DIRECTORY:
            assert ref.path is not None
            check_safe_files(ref.path, self.settings)  # pickle-only or remote code: refused with how to opt in
        return ref

    def _local_update(self, model_ref: str, version: int) -> None:
        info = self.replica.stage(model_ref, version)
        if info.state is StageState.STAGED:
            self.replica.flip(version)

    def check_model(self, model_ref: str) -> dict[str, Any]:
        """POST /admin/stage with ``check_only``: would this replica find and accept the model? (no download)"""
        ref = self._precheck(model_ref)
        check_available(ref, self.settings, self.store)
        return {"status": "ok", "model": model_ref, "replica_id": self.replica_id}

    def start_stage(self, model_ref: str, version: int, digest: str | None, rollout: str | None = None,
                    peers: list[str] | None = None) -> dict[str, Any]:
        """POST /admin/stage: a prepare, staged in the background; poll GET /status for the outcome.

        ``peers``: the replicas to ask first for the version's chunks, nearest first (lockstep.sync.distribution)."""
        self._precheck(model_ref)
        self._suggest_peers(version, peers)
        self.agent.tell(pending=Pending(version=version, model=model_ref, digest=digest, phase=Phase.PREPARE,
                                        rollout=rollout), split=None)
        return {"status": "staging", "version": version, "model": model_ref, "replica_id": self.replica_id}

    def _suggest_peers(self, version: int, peers: object) -> None:
        """Peers to ask first for ``version``'s chunks (bad URLs and this replica's own are dropped)."""
        if not isinstance(peers, list) or not isinstance(self.store, VersionCache):
            return
        mine = (self.url or "").rstrip("/")
        usable = [p for p in peers[:16] if url_problem(p) is None and p.rstrip("/") != mine]
        self.store.suggest_peers(version, usable)

    def schedule_commit(self, version: int, activate_at: float) -> dict[str, Any]:
        """POST /admin/commit: a commit, flipped at ``activate_at`` (wall clock) when staged; else 409, unready."""
        info, serving = self.replica.stage_info, self.replica.serving_info()
        mine = info if info is not None and info.version == version else None
        have = serving if serving is not None and serving.version == version else mine
        name, sha = (have.model, have.digest) if have else ("", None)
        self.agent.tell(committed=Committed(version=version, model=name, digest=sha, activate_at=activate_at,
                                            committed_at=self.clock.time(), rollback=True),  # rollbacks too
                        pending=Pending(version=version, model=name, digest=sha, phase=Phase.COMMIT))
        if serving is not None and serving.version == version and mine is None:
            return {"status": "serving", "version": version, "replica_id": self.replica_id}
        if mine is None or mine.state is not StageState.STAGED:
            # The cluster committed a version this replica does not have: it must not take traffic until it
            # catches up (the trainer stages and commits it again), so it went unready.
            raise Conflict(f"v{version} is not staged on {self.replica_id} ({mine.state.value if mine else 'nothing'} "
                           "for it); unready until it is staged and committed")
        return {"status": "committing", "version": version, "activate_at": activate_at, "replica_id": self.replica_id}

    def schedule_split(self, split: Split, model: str) -> dict[str, Any]:
        """POST /admin/split: a rollout step, in force at its ``activate_at``; 409 (unready) when not staged here."""
        info = self.replica.stage_info
        digest = info.digest if info is not None and info.version == split.version else None
        self.agent.tell(pending=Pending(version=split.version, model=model, digest=digest, phase=Phase.CANARY,
                                        rollout=split.rollout), split=split)
        info = self.replica.stage_info
        if split.share > 0 and (info is None or info.version != split.version or info.state is not StageState.STAGED):
            raise Conflict(f"v{split.version} is not staged on {self.replica_id} "
                           f"({info.state.value if info and info.version == split.version else 'nothing'} for it); "
                           "unready until it is staged")
        return {"status": "split", "version": split.version, "share": split.share, "step": split.step,
                "activate_at": split.activate_at, "replica_id": self.replica_id}

    async def session_pins(self, rollout: str, step: int, timeout_s: float = 10.0) -> list[str]:
        """This replica's sessions the committed version answered before ``step`` took effect (404: other step)."""
        # Awaited on the event loop, never in a worker thread: those threads admit the generation requests, and a
        # few callers waiting here for a step would hold every one of them.
        deadline = self.clock.monotonic() + timeout_s
        while (pins := self.replica.router.frozen_pins(rollout, step)) is None:
            if self.clock.monotonic() >= deadline:
                raise NotFound(f"step {step} of rollout {rollout!r} is not in force on {self.replica_id}")
            await asyncio.sleep(0.005)
        return pins

    def abort_stage(self, version: int | None) -> dict[str, bool]:
        """POST /admin/abort: an abort of what is staged (only ``version`` when given)."""
        info = self.replica.stage_info
        version = info.version if version is None and info is not None else version
        if version is None:
            return {"aborted": False}
        done = self.agent.tell(pending=Pending(version=version, model=info.model if info else "", phase=Phase.ABORT,
                                               reason="aborted by the trainer"))
        return {"aborted": any(isinstance(a, Abort) for a in done)}

    # ------------------------------------------------------------------ views
    def check_generation_limits(self, prompt_chars: int, max_new_tokens: int) -> None:
        """400 for prompts or lengths over the configured limits (the engine checks the context window)."""
        s = self.settings
        if prompt_chars > s.max_prompt_chars:
            raise BadRequest(f"prompt is {prompt_chars} characters; the limit is {s.max_prompt_chars} "
                             "(LOCKSTEP_MAX_PROMPT_CHARS)")
        if max_new_tokens > s.max_new_tokens_limit:
            raise BadRequest(f"max_new_tokens={max_new_tokens} is over the limit of {s.max_new_tokens_limit} "
                             "(LOCKSTEP_MAX_NEW_TOKENS_LIMIT)")

    def refresh_gauges(self) -> None:
        queued, running = self.replica.engine_load()
        m = self.replica.metrics
        m.queue_depth.set(queued)
        m.running.set(running)
        m.tokens_per_second.set(self.token_rate.rate())
        m.ready.set(1 if self.replica.ready else 0)

    def status(self) -> dict[str, Any]:
        """``report()`` as JSON."""
        return self.report().model_dump(mode="json")

    def report(self) -> ReplicaStatus:
        """What ``GET /status`` answers: the heartbeat, and what only a direct caller needs (docs/api.md)."""
        beat = self.watcher.heartbeat() if self.watcher is not None else heartbeat_of(
            self.replica, self.settings, replica_id=self.replica_id, url=self.url, clock=self.clock,
            token_rate=self.token_rate)
        return ReplicaStatus(**dict(beat), committed_version=self.replica.committed_version,
                             splits=list(self.replica.splits),
                             engine=self.replica.engine_kind.value,
                             uptime_s=round(self.clock.time() - self.started_at, 3),
                             shared_dir=str(self.settings.shared_dir) if self.settings.shared_dir else None,
                             coordinator_url=self.settings.coordinator_url)
