"""Bounded background load and readiness watching for end-to-end update tests (docs/protocol.md §4).

``GenerationLoad`` keeps a few client threads calling ``POST /generate`` (greedy) on each replica and
records every answer. ``ReadyWatch`` polls ``GET /ready`` on each replica and reads ``sync_state.json``,
so a test can tell whether a replica answered 200 while it served something other than the version the
cluster committed, later than ``activate_at`` plus a grace. ``check_*`` turn both records into findings.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lockstep.core.clock import SYSTEM_CLOCK
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.sync.coordinator import Coordinator, PublishResult
from tests.support.cluster import LocalCluster, Proc, spawn, wait_for

PROMPTS = ("Once upon a time", "One, two, three,")
MAX_NEW_TOKENS = 8  # short answers: many requests straddle each flip without loading the 2-core machine


@dataclass(frozen=True)
class Answer:
    """One ``POST /generate`` as the client saw it (wall-clock times)."""

    replica: str
    prompt: str
    sent: float
    received: float
    status: int  # 0 when the connection failed
    header_version: int | None = None
    body_version: int | None = None
    text: str | None = None
    error: str | None = None


class GenerationLoad:
    """Client threads per replica calling ``POST /generate`` until told to stop; a context manager."""

    def __init__(self, targets: dict[str, str] | None = None, *, threads_per_replica: int = 2,
                 pause_s: float = 0.02, prompts: Iterable[str] = PROMPTS) -> None:
        self.threads_per_replica = threads_per_replica
        self.pause_s = pause_s  # think time between requests of one thread (keeps the machine usable)
        self.prompts = tuple(prompts)
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stops: dict[str, threading.Event] = {}
        self._threads: dict[str, list[threading.Thread]] = {}
        for name, url in (targets or {}).items():
            self.add(name, url)

    def add(self, name: str, url: str) -> None:
        """Start loading replica ``name`` (again, after a restart)."""
        self.remove(name)
        stop = threading.Event()
        self._stops[name] = stop
        self._threads[name] = [
            threading.Thread(target=self._run, args=(name, url, stop, i), daemon=True,
                             name=f"load-{name}-{i}") for i in range(self.threads_per_replica)]
        for t in self._threads[name]:
            t.start()

    def remove(self, name: str) -> None:
        """Stop loading ``name`` and wait for its requests in flight (call before killing it)."""
        stop = self._stops.pop(name, None)
        if stop is not None:
            stop.set()
        for t in self._threads.pop(name, []):
            t.join(timeout=120)

    def stop(self) -> list[Answer]:
        for name in list(self._stops):
            self.remove(name)
        return self.answers

    def __enter__(self) -> GenerationLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self, replica: str | None = None) -> int:
        with self._lock:
            return sum(1 for a in self.answers if replica is None or a.replica == replica)

    def _run(self, name: str, url: str, stop: threading.Event, index: int) -> None:
        i = index
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                prompt = self.prompts[i % len(self.prompts)]
                i += 1
                sent = time.time()
                try:
                    r = client.post("/generate", json={"prompt": prompt, "max_new_tokens": MAX_NEW_TOKENS,
                                                       "temperature": 0})
                    received = time.time()
                    is_json = r.headers.get("content-type", "").startswith("application/json")
                    body = r.json() if is_json else {}
                    header = r.headers.get("X-Model-Version")
                    answer = Answer(name, prompt, sent, received, r.status_code,
                                    int(header) if header is not None else None, body.get("model_version"),
                                    body.get("text"), None if r.status_code == 200 else r.text[:300])
                except httpx.HTTPError as exc:
                    answer = Answer(name, prompt, sent, time.time(), 0, error=f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.answers.append(answer)
                stop.wait(self.pause_s)


@dataclass(frozen=True)
class Commit:
    """A commit as ``sync_state.json`` announced it: from ``activate_at`` on, ``version`` must be served."""

    version: int
    activate_at: float


@dataclass(frozen=True)
class ReadySample:
    """One ``GET /ready``; the answer shows the replica at a moment between ``sent`` and ``received``."""

    replica: str
    sent: float  # wall clock
    received: float
    status: int  # 0 when the connection failed
    serving_version: int | None


@dataclass
class ReadyWatch:
    """Polls ``/ready`` on every replica and ``sync_state.json``; a context manager."""

    sync_state: Path
    interval_s: float = 0.03
    commits: list[Commit] = field(default_factory=list)
    samples: list[ReadySample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stops: dict[str, threading.Event] = {}
        self._generation = -1
        if not self._read_state():
            self.commits.append(Commit(0, 0.0))  # a cluster that never published serves version 0
        t = threading.Thread(target=self._watch_state, daemon=True, name="watch-sync-state")
        t.start()
        self._threads.append(t)

    def add(self, name: str, url: str) -> None:
        """Watch replica ``name`` at ``url`` (replacing an earlier watch of that name: a restart)."""
        if name in self._stops:
            self._stops[name].set()
        stop = threading.Event()
        self._stops[name] = stop
        t = threading.Thread(target=self._watch_ready, args=(name, url, stop), daemon=True,
                             name=f"ready-{name}")
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for stop in self._stops.values():
            stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def __enter__(self) -> ReadyWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read_state(self) -> bool:
        """Record a new commit; True when the file held a state that counts."""
        # Only a higher generation with an activate_at counts: hand-written states (lower generation, no
        # activate_at, torn) are what replicas must ignore too. The first one read may lack activate_at.
        try:
            raw = json.loads(self.sync_state.read_bytes())
            generation = int(raw["generation"])
            committed = raw["committed"]
            version = int(committed["version"])
            at = committed.get("activate_at")
            activate_at = float(at) if at is not None else (0.0 if not self.commits else None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if generation <= self._generation or activate_at is None:
            return False
        self._generation = generation
        with self._lock:
            if not self.commits or self.commits[-1] != Commit(version, activate_at):
                self.commits.append(Commit(version, activate_at))
        return True

    def _watch_state(self) -> None:
        while not self._stop.wait(0.01):
            self._read_state()

    def _watch_ready(self, name: str, url: str, stop: threading.Event) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not (stop.is_set() or self._stop.is_set()):
                sent = time.time()
                try:
                    r = client.get("/ready")
                    serving = r.json().get("serving_version")
                    sample = ReadySample(name, sent, time.time(), r.status_code, serving)
                except (httpx.HTTPError, ValueError):
                    sample = ReadySample(name, sent, time.time(), 0, None)
                with self._lock:
                    self.samples.append(sample)
                stop.wait(self.interval_s)

    def snapshot(self) -> tuple[list[Commit], list[ReadySample]]:
        """The commits and samples recorded so far."""
        with self._lock:
            return list(self.commits), list(self.samples)

    def samples_of(self, replica: str) -> list[ReadySample]:
        with self._lock:
            return [s for s in self.samples if s.replica == replica]


def stale_ready(watch: ReadyWatch, grace_s: float = 0.25) -> list[str]:
    """200 on ``/ready`` while serving a version other than the one committed more than ``grace_s`` ago."""
    commits, samples = watch.snapshot()
    found = []
    for s in samples:
        if s.status != 200:
            continue
        settled = [i for i, c in enumerate(commits) if c.activate_at + grace_s <= s.sent]
        last = settled[-1] if settled else 0
        # The settled commit, or a later one whose flip may have happened before the answer left.
        allowed = {commits[last].version}
        allowed |= {c.version for c in commits[last + 1:] if c.activate_at <= s.received}
        if s.serving_version not in allowed:
            c = commits[last]
            found.append(f"{s.replica} answered /ready 200 serving v{s.serving_version} at {s.sent:.3f}, "
                         f"{s.sent - c.activate_at:.3f}s after v{c.version} was to be active")
    return found


def check_answers(answers: list[Answer], expected: dict[int, dict[str, str]]) -> list[str]:
    """Every answer succeeded, says the same version in header and body, and is that version's greedy text."""
    found = []
    for a in answers:
        if a.status != 200:
            found.append(f"{a.replica}: {a.prompt!r} failed with {a.status}: {a.error}")
        elif a.header_version != a.body_version:
            found.append(f"{a.replica}: header says v{a.header_version}, body says v{a.body_version}")
        elif a.body_version not in expected:
            found.append(f"{a.replica}: answered as v{a.body_version}, which the test never committed")
        elif a.text != expected[a.body_version][a.prompt]:
            found.append(f"{a.replica}: v{a.body_version} answered {a.text!r} to {a.prompt!r}; that "
                         f"version's greedy text is {expected[a.body_version][a.prompt]!r}")
    return found


def check_no_flip_flop(answers: list[Answer], commits: list[Commit], clock_slack_s: float = 0.05) -> list[str]:
    """A replica moves only forward along the commit history: never back to what it served before.

    Answers overlapping in time may finish in either order, so only an answer *sent after* another
    finished is held to come from the same or a later commit. A version committed twice (a rollback)
    matches its later commit only for answers that finished after that commit's ``activate_at``: an
    old request that drained on the first one is not the rollback.
    """
    found = []
    for replica in sorted({a.replica for a in answers}):
        mine = sorted((a for a in answers if a.replica == replica and a.status == 200),
                      key=lambda a: a.received)
        pos, since = 0, None  # position in the history reached, and the answer that reached it
        for a in mine:
            later = [i for i in range(pos, len(commits)) if commits[i].version == a.body_version
                     and commits[i].activate_at <= a.received + clock_slack_s]
            if later:
                if later[-1] > pos:
                    pos, since = later[-1], a
                continue
            if since is not None and a.sent > since.received:
                found.append(f"{replica} answered v{a.body_version} at {a.sent:.3f} after it had served "
                             f"v{since.body_version} (commit order {[c.version for c in commits]})")
    return found


# ---------------------------------------------------------------------------------------------------- oracle
_TEXTS: dict[str, dict[str, str]] = {}


def greedy_texts(model_dir: Path, prompts: Iterable[str] = PROMPTS, dtype: str = "float32") -> dict[str, str]:
    """What ``model_dir`` answers to each prompt, greedily, from a standalone built-in engine in this process.

    Cached per folder and dtype. Same device choice as a replica with default settings.
    """
    key = f"{Path(model_dir).resolve()}|{dtype}"
    if key not in _TEXTS:
        from lockstep.engine import Engine, SamplingParams
        from lockstep.models import loader

        settings = Settings(device="auto", dtype=dtype, trust_remote_code=False, allow_pickle=False)
        loaded = loader.load(loader.resolve(str(Path(model_dir).resolve()), settings), settings)
        engine = Engine(loaded.model, loaded.tokenizer, max_context=loaded.max_context).start()
        try:
            params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
            _TEXTS[key] = {p: engine.generate(loaded.tokenizer(p)["input_ids"], params, timeout=60).text
                           for p in PROMPTS}
        finally:
            engine.stop(drain=False)
            engine.close()
    return {p: _TEXTS[key][p] for p in prompts}


# ------------------------------------------------------------------------------------------------ scenario
class UpdateScenario:
    """A local cluster under load, its readiness watched; ``finish`` checks invariants 1–4 of docs/protocol.md §4."""

    def __init__(self, cluster: LocalCluster, *, grace_s: float = 0.25, dtype: str = "float32") -> None:
        self.cluster = cluster
        self.dtype = dtype  # the replicas' LOCKSTEP_DTYPE, for the oracle
        self.grace_s = grace_s  # the stale-ready bound past activate_at, seconds
        self.watch = ReadyWatch(self.sync_path)
        self.load = GenerationLoad()
        for proc in cluster.replicas:
            if proc.alive():
                self.serve(proc)

    @property
    def sync_path(self) -> Path:
        return self.cluster.shared / "sync_state.json"

    def serve(self, proc: Proc) -> None:
        """Put ``proc`` under load and watch its readiness (a replica that just came up)."""
        self.load.add(proc.name, proc.url)
        self.watch.add(proc.name, proc.url)

    def kill(self, proc: Proc) -> None:
        """kill -9 after its clients stopped (only replicas that stay up must answer every request)."""
        self.load.remove(proc.name)
        proc.kill(signal.SIGKILL)

    def state(self) -> dict[str, Any]:
        return json.loads(self.sync_path.read_bytes())  # type: ignore[no-any-return]

    def wait_state(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60,
                   interval: float = 0.005) -> dict[str, Any]:
        """Poll sync_state.json until ``predicate`` holds; returns that state."""
        def check() -> dict[str, Any] | None:
            state = self.state()
            return state if predicate(state) else None
        return wait_for(check, timeout, interval, what)  # type: ignore[no-any-return]

    def committed_version(self) -> int:
        """The committed version in sync_state.json; 0 before the first publish."""
        if not self.sync_path.exists():
            return 0
        return int(self.state()["committed"]["version"])

    def settings(self, **overrides: Any) -> Settings:
        """Settings of a coordinator here, as ``lockstep publish`` in the cluster's env reads them."""
        base: dict[str, Any] = {"shared_dir": self.cluster.shared, "builtin_dir": self.cluster.builtin_dir,
                                "hf_hub_offline": True, "poll_interval_s": 0.05, "heartbeat_interval_s": 0.2,
                                "heartbeat_ttl_s": 3.0, "commit_policy": CommitPolicy.STRICT,
                                "stage_timeout_s": 60.0, "lease_ttl_s": 30.0, "commit_margin_s": 0.5,
                                "sync_state_file": None, "hf_home": None,
                                "initial_model_repo_id": "builtin:tiny"}
        return Settings(**{**base, **overrides})

    def coordinator(self, **overrides: Any) -> Coordinator:
        return Coordinator(self.settings(**overrides), clock=SYSTEM_CLOCK, owner="test-coordinator")

    def publish(self, ref: str, **overrides: Any) -> PublishResult:
        """A whole two-phase publish from this process (the same code ``lockstep publish`` runs)."""
        return self.coordinator(**overrides).publish(ref)

    def publish_in_background(self, ref: str, **overrides: Any) -> Future[PublishResult]:
        executor = ThreadPoolExecutor(1, thread_name_prefix="publish")
        future = executor.submit(self.publish, ref, **overrides)
        executor.shutdown(wait=False)
        return future

    def start_cli(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """``python -m lockstep ARGS`` in the background, its output in ``logs/<name>.log``."""
        proc = spawn(name, list(args), self.cluster.env(**env), self.cluster.root / "logs", 0)
        self.cluster.others.append(proc)
        return proc.process

    def wait_lease_free(self, timeout: float = 60) -> None:
        """Until the coordinator lease is released or expired (a killed coordinator leaves it behind)."""
        path = self.cluster.shared / "locks" / "coordinator.lease"

        def free() -> bool:
            try:
                return float(json.loads(path.read_bytes())["expires_at"]) < time.time()
            except FileNotFoundError:
                return True
        wait_for(free, timeout, 0.05, "the coordinator lease to be released or expire")

    def model_dir(self, version: int) -> Path:
        """The folder version ``version`` was published from (the oracle reads the source, not the copy)."""
        if version == 0:
            return self.cluster.builtin_dir / "tiny-s0"
        folder = self.cluster.shared / "versions" / f"{version:06d}"
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        source = str(manifest["source"])
        return self.cluster.builtin_dir / source.removeprefix("builtin:") if source.startswith("builtin:") \
            else Path(source)

    def close(self) -> None:
        """Stop the load and the watch (idempotent)."""
        self.load.stop()
        self.watch.stop()

    def finish(self) -> None:
        """Stop load and watch; assert no failure, true labels and texts, no stale ready, no flip-flop."""
        self.close()
        answers = self.load.answers
        assert answers, "the load generator sent nothing"
        versions = {a.body_version for a in answers if a.status == 200 and a.body_version is not None}
        expected = {v: greedy_texts(self.model_dir(v), dtype=self.dtype) for v in versions}
        problems = check_answers(answers, expected)
        problems += stale_ready(self.watch, self.grace_s)
        problems += check_no_flip_flop(answers, self.watch.snapshot()[0])
        summary = f"{len(problems)} problems in {len(answers)} answers:\n"
        assert not problems, summary + "\n".join(problems[:20])
