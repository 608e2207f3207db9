"""How big an engine's batch and KV cache are when none is configured: a paged cache of as many positions as a
share of the free memory holds (within bounds, in full contexts), and a batch capped where a CPU's decode step
stops paying for more sequences."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lockstep.core.numbers import parse_decimal
from lockstep.engine.kv_cache import BLOCK_SIZE, blocks_for

# The old fixed default. The auto cache never holds fewer full contexts unless not even that many fit in all the
# memory free.
MIN_AUTO_BATCH = 16
# The most sequences an auto-sized engine runs at once, and the most full contexts its cache holds. Past these a
# decode step costs more than the extra sequences bring. On 2 CPU cores (mid, 116 M, float32)
# decode throughput peaked at 128 sequences and fell beyond (quiet: 296 tok/s at 128, 279 at 192, 259 at 256)
# while each step kept growing (docs/benchmarks.md, issue 11); a GPU's decode step stays bound by reading the
# weights to far larger batches.
MAX_AUTO_BATCH = {"cpu": 128, "cuda": 256}
# Share of the free memory one engine's KV cache may take. A swap-mode replica holds two models and two engines
# while it stages; an inplace one keeps a copy of the staged weights in host RAM; on a CPU the tokenizer, the
# HTTP server and the other replicas of the host share the same RAM: with a quarter, four `mid` replicas on
# 24 GiB left too little for their stages (an engine never takes fewer than 16 sequences) and one was killed.
MEMORY_SHARE = {"cpu": 0.125, "cuda": 0.4}
CGROUP_ROOT = Path("/sys/fs/cgroup")


def claim_lock() -> Path:
    """The host-wide claim lock: in the temp folder as it is when an engine starts (tests move it per session)."""
    return Path(tempfile.gettempdir()) / "lockstep-memory-claim.lock"


def kv_cache_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes the engine's KV cache (``KVCache``) holds per position: K and V of every layer."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * int(cfg.num_hidden_layers) * kv_heads * head_dim * item


def full_context_tokens(max_context: int) -> int:
    """Cache positions one sequence at the full context takes (whole blocks)."""
    return blocks_for(max_context) * BLOCK_SIZE


def kv_cache_bytes_per_sequence(config: Any, dtype: torch.dtype, max_context: int) -> int:
    """Bytes one sequence at the full ``max_context`` takes in the KV cache."""
    return kv_cache_bytes_per_token(config, dtype) * full_context_tokens(max_context)


def _read_int(path: Path) -> int | None:
    """An integer file of the cgroup filesystem; None when absent, unreadable or 'max' (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return parse_decimal(text)


def _stat(path: Path, key: str) -> int:
    """One counter of a cgroup memory.stat file (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and (count := parse_decimal(value.strip())) is not None:
                return count
    except OSError:
        pass
    return 0


def cgroup_headroom_bytes(root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this container may still use under its memory limit (cgroup v2 or v1); None without a limit.

    Reclaimable page cache (inactive files) counts as free, as the kubelet counts it."""
    for limit_file, usage_file, stat_file, inactive_key in (
        (root / "memory.max", root / "memory.current", root / "memory.stat", "inactive_file"),
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes",
         root / "memory" / "memory.stat", "total_inactive_file"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is None or usage is None or limit >= 1 << 60:  # v1 writes "no limit" as a huge number
            continue
        working_set = max(0, usage - _stat(stat_file, inactive_key))
        return max(0, limit - working_set)
    return None


def host_available_bytes(cgroup_root: Path = CGROUP_ROOT) -> int:
    """RAM a new allocation can take without swapping: the OS's available memory, within the container's limit."""
    import psutil

    available = int(psutil.virtual_memory().available)
    headroom = cgroup_headroom_bytes(cgroup_root)
    return available if headroom is None else min(available, headroom)


def available_memory_bytes(device: torch.device) -> int | None:
    """Bytes free for a KV cache on ``device``: free device memory on CUDA (with what this process's allocator
    holds unused), available RAM on a CPU; None where it cannot be told."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return host_available_bytes()
    return None


def auto_batch_size(per_sequence_bytes: int, available_bytes: int | None, device_type: str) -> int:
    """Full-context sequences the auto KV cache holds: as many as fit in the device's share of
    ``available_bytes``, clamped to [MIN_AUTO_BATCH, the device's cap]; under MIN_AUTO_BATCH only as many as fit
    in all of it (at least 1). Unknown memory: MIN_AUTO_BATCH."""
    if per_sequence_bytes < 1:
        raise ValueError(f"per_sequence_bytes must be >= 1, got {per_sequence_bytes}")
    if available_bytes is None:
        return MIN_AUTO_BATCH
    kind = device_kind(device_type)
    by_share = int(available_bytes * MEMORY_SHARE[kind]) // per_sequence_bytes
    fit_all = max(0, available_bytes) // per_sequence_bytes
    return max(1, min(max(by_share, MIN_AUTO_BATCH), MAX_AUTO_BATCH[kind], fit_all))


def device_kind(device_type: str) -> str:
    """The row of the per-device tables: "cpu", or "cuda" for any accelerator."""
    return "cpu" if device_type == "cpu" else "cuda"


# Ledger keys of engines collected without close(). A finalizer may run inside the garbage collector, and so inside
# a claim this thread holds: it only notes the key, and the next claim drops the line.
_forgotten: set[str] = set()


def forget(key: str) -> None:
    """An engine nobody closed was collected: its line goes at the next claim (no file I/O here)."""
    _forgotten.add(key)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


@dataclass
class Reservation:
    """One engine's KV cache in the host's ledger of reservations (``MemoryClaim``)."""

    ledger: Path
    key: str

    def withdraw(self) -> None:
        """The cache is gone: drop its line (and those of processes that died)."""
        with _locked(self.ledger.with_suffix(".lock")) as held:
            if held:
                _write_ledger(self.ledger, {k: v for k, v in _read_ledger(self.ledger).items() if k != self.key})


@dataclass
class MemoryClaim:
    """What an engine sizes its CPU KV cache against, under the host-wide claim lock.

    A CPU cache's pages are touched only when sequences write them (``kv_cache.zeros``), so the OS's available
    memory does not count a cache that was just allocated. Every CPU engine therefore records its cache in a
    ledger beside the lock, and auto sizing subtracts what the live engines recorded. Pages they already wrote
    are counted twice: an engine may size a little small, never so that the caches together overcommit.
    """

    ledger: Path | None
    reserved_bytes: int = 0  # recorded by live engines on this host, this process's included

    def reserve(self, nbytes: int) -> Reservation | None:
        """Record this engine's cache (None where there is no ledger)."""
        if self.ledger is None or nbytes <= 0:
            return None
        key = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        _write_ledger(self.ledger, {**_read_ledger(self.ledger), key: nbytes})
        return Reservation(self.ledger, key)


def _read_ledger(path: Path) -> dict[str, int]:
    """``key -> bytes`` of live processes' caches; a torn or foreign line is skipped."""
    entries: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return entries
    for line in lines:
        key, _, nbytes = line.partition(" ")
        pid, size = parse_decimal(key.partition("-")[0]), parse_decimal(nbytes)
        if pid is not None and size is not None and _alive(pid):
            entries[key] = size
    return entries


def _write_ledger(path: Path, entries: dict[str, int]) -> None:
    try:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("".join(f"{k} {v}\n" for k, v in entries.items()))
        tmp.replace(path)
    except OSError:  # a ledger that cannot be written only loses the accounting
        pass


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[bool]:
    """Hold the host-wide claim lock; yields False (nothing held) when the lock file cannot be opened."""
    try:
        handle = open(lock_path, "a")  # noqa: SIM115 - held across the yield
    except OSError:
        yield False
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def memory_claim(device: torch.device, *, lock_path: Path | None = None) -> Iterator[MemoryClaim]:
    """Hold the host-wide claim lock while an engine sizes its cache and records it.

    Without it, replicas that start together all see the same free memory and together take more than there
    is. Only on a CPU (a GPU belongs to one replica, and its cache is written out when allocated); a lock file
    that cannot be opened only loses the accounting.
    """
    if device.type != "cpu":
        yield MemoryClaim(None)
        return
    lock = lock_path or claim_lock()
    with _locked(lock) as held:
        if not held:
            yield MemoryClaim(None)
            return
        ledger = lock.with_suffix(".ledger")
        entries = _read_ledger(ledger)
        gone = _forgotten & entries.keys()
        if gone:
            entries = {k: v for k, v in entries.items() if k not in gone}
            _write_ledger(ledger, entries)
            _forgotten.difference_update(gone)
        yield MemoryClaim(ledger, sum(entries.values()))


@dataclass(frozen=True)
class BatchSizing:
    """The batch size and KV cache an engine runs with and, when sized from memory, from what."""

    size: int
    kv_tokens: int
    auto: bool
    per_token_bytes: int | None = None
    available_bytes: int | None = None

    def describe(self) -> str:
        """One line for the engine's start-up log."""
        if not self.auto:
            return f"max batch size {self.size} (configured), KV cache for {self.kv_tokens} positions"
        free = "unknown" if self.available_bytes is None else f"{self.available_bytes / 2**30:.1f} GiB"
        per_token = (self.per_token_bytes or 0) / 2**10
        return (f"max batch size {self.size}, KV cache for {self.kv_tokens} positions (auto: {per_token:.0f} KiB "
                f"per position, {free} free)")


def size_batch(requested: int | None, config: Any, dtype: torch.dtype, device: torch.device,
               max_context: int, reserved_bytes: int = 0) -> BatchSizing:
    """``requested`` >= 1: that many sequences, each with room for the full context. None or 0 (auto): a cache
    sized from the memory free on ``device`` now, less ``reserved_bytes`` that other caches hold but the OS does
    not count yet (``auto_batch_size`` full contexts, which short requests share among more sequences) and a
    batch of up to the device's cap."""
    context = full_context_tokens(max_context)
    if requested:
        return BatchSizing(requested, kv_tokens=requested * context, auto=False)
    per_token = kv_cache_bytes_per_token(config, dtype)
    available = available_memory_bytes(device)
    if available is not None:
        available = max(0, available - reserved_bytes)
    kind = device_kind(device.type)
    contexts = auto_batch_size(per_token * context, available, device.type)
    return BatchSizing(MAX_AUTO_BATCH[kind], kv_tokens=contexts * context, auto=True, per_token_bytes=per_token,
                       available_bytes=available)
