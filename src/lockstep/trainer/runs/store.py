"""Runs on the shared volume: ``runs/<id>/run.json``, ``metrics.jsonl``, ``samples.jsonl``, ``checkpoints/``,
``logs/`` (a job run's pod logs).

``run.json`` is replaced atomically (temporary file, fsync, rename). The ``.jsonl`` streams are appended one
whole line per ``write`` and fsynced; a reader skips a torn last line left by a crash.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lockstep.core.atomic import atomic_write_bytes, atomic_write_json, read_json, read_regular
from lockstep.core.errors import BadRequest, NotFound
from lockstep.trainer.runs.record import RunRecord

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
POD_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,252}$")  # a DNS subdomain: no '/', so never a path out of logs/


class UnreadableRun(NotFound):
    """A run folder whose run.json cannot be read (torn by hand, a foreign file): 404 to readers; it may be deleted."""


def _removed(path: Path) -> bool:
    """Remove ``path`` and everything under it; whether it is gone."""
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


class RunFiles:
    """The files of one run."""

    def __init__(self, folder: Path, cache: LineCache | None = None) -> None:
        self.folder = folder
        self.cache = cache or LineCache()

    @property
    def run_json(self) -> Path:
        return self.folder / "run.json"

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.jsonl"

    @property
    def samples_path(self) -> Path:
        return self.folder / "samples.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def logs_dir(self) -> Path:
        return self.folder / "logs"

    def write_log(self, name: str, text: str) -> None:
        """Replace ``logs/<name>.log`` (a job pod's log as last read) in one rename."""
        if not POD_NAME.match(name):
            raise BadRequest(f"log name {name!r} is not a pod name (lower-case letters, digits, '-' and '.')")
        atomic_write_bytes(self.logs_dir / f"{name}.log", text.encode())

    def logs(self) -> dict[str, str]:
        """Every copied log by name, oldest file first."""
        if not self.logs_dir.is_dir():
            return {}
        paths = sorted(self.logs_dir.glob("*.log"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        logs = {}
        for path in paths:
            try:
                logs[path.stem] = read_regular(path).decode("utf-8", errors="replace")
            except OSError as exc:  # gone meanwhile, or not a regular file (which would block the read)
                log.warning("cannot read the log %s: %s", path, exc)
        return logs

    def drop_checkpoints(self) -> None:
        """Remove ``checkpoints/`` (weights, optimizer and RNG state) of a run that can no longer resume.

        Its versions are in the model store; what only a resume would read is, per checkpoint, several times the
        model, and a trainer that runs one fine-tune after another would otherwise fill its volume.
        """
        if not _removed(self.checkpoints):
            log.warning("could not remove all of %s; delete it by hand to free the space", self.checkpoints)

    def write(self, record: RunRecord) -> None:
        atomic_write_json(self.run_json, record.model_dump(mode="json"))

    def read(self) -> RunRecord:
        return RunRecord.model_validate(read_json(self.run_json))

    def append_metric(self, point: dict[str, Any]) -> None:
        _append(self.metrics_path, point)

    def append_sample(self, sample: dict[str, Any]) -> None:
        _append(self.samples_path, sample)

    def metrics(self) -> list[dict[str, Any]]:
        return self.cache.read(self.metrics_path)

    def samples(self) -> list[dict[str, Any]]:
        return self.cache.read(self.samples_path)


def _append(path: Path, obj: dict[str, Any]) -> None:
    line = (json.dumps(obj, separators=(",", ":"), sort_keys=True, default=str) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of one line: appends do not interleave within a line
        os.fsync(fd)
    finally:
        os.close(fd)


class LineCache:
    """Parsed ``.jsonl`` files, reparsed only when they changed (GET /runs reads every run each second).

    Only this trainer appends to these files, so its own view of their size and mtime tells when they changed.
    """

    def __init__(self, max_files: int = 256) -> None:
        self.max_files = max_files
        self._entries: dict[Path, tuple[tuple[int, int], list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def read(self, path: Path) -> list[dict[str, Any]]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._entries.get(path)
        if cached is not None and cached[0] == key:
            return list(cached[1])
        try:
            data = read_regular(path)
        except FileNotFoundError:
            return []
        except OSError as exc:  # a FIFO there would hold GET /runs (and the worker threads) for good
            log.warning("cannot read %s: %s", path, exc)
            return []
        out = _parse_lines(data)
        with self._lock:
            if len(self._entries) >= self.max_files:
                self._entries.pop(next(iter(self._entries)))
            # A file that grew while it was read is reread next time.
            self._entries[path] = (key if len(data) == st.st_size else (-1, -1), out)
        return list(out)


def _parse_lines(data: bytes) -> list[dict[str, Any]]:
    out = []
    for raw in data.splitlines():
        try:
            obj = json.loads(raw)
        except ValueError:
            continue  # a torn last line from a crash
        if isinstance(obj, dict):
            out.append(obj)
    return out


class RunStore:
    """Every run's folder under ``<shared>/runs``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.cache = LineCache()

    def new_id(self, kind: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return f"{stamp}-{kind[:10]}-{secrets.token_hex(3)}"

    def files(self, run_id: str) -> RunFiles:
        if not RUN_ID.match(run_id):
            raise BadRequest(f"run id {run_id!r} is malformed: lower-case letters, digits and '-' only")
        return RunFiles(self.root / run_id, self.cache)

    def get(self, run_id: str) -> RunRecord:
        files = self.files(run_id)
        try:
            return files.read()
        except FileNotFoundError:
            raise NotFound(f"no run {run_id!r}; GET /runs lists the runs") from None
        except (OSError, ValueError, ValidationError) as exc:
            raise UnreadableRun(f"run {run_id!r} has an unreadable run.json: {exc}; DELETE /runs/{run_id} "
                                "removes its folder") from exc

    def delete(self, run_id: str) -> None:
        """Remove a run's folder: its record, metrics, samples, checkpoints and copied logs."""
        folder = self.files(run_id).folder
        if not _removed(folder):
            raise OSError(f"could not remove all of {folder}; delete it by hand")

    def load_all(self) -> list[RunRecord]:
        """Every readable run, oldest first; unreadable folders are skipped (logged)."""
        records: list[RunRecord] = []
        if not self.root.is_dir():
            return records
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or not RUN_ID.match(folder.name):
                continue
            try:
                records.append(RunFiles(folder, self.cache).read())
            except FileNotFoundError:
                continue
            except (OSError, ValueError, ValidationError) as exc:
                log.warning("skipping run folder %s: unreadable run.json (%s)", folder, exc)
        records.sort(key=lambda r: r.created_at)
        return records
