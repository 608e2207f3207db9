"""The engine's batch size: sized from free memory when none is given (clamped per device), else as given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lockstep.core.errors import BadRequest
from lockstep.engine import Engine, SamplingParams, batch_size
from lockstep.engine.batch_size import MAX_AUTO_BATCH, MEMORY_SHARE, MIN_AUTO_BATCH, auto_batch_size
from lockstep.engine.kv_cache import BLOCK_SIZE
from lockstep.engine.llama_runner import LlamaRunner

from . import CORPUS, encode, hf_greedy, llama, tokenizer

MIB = 2**20
GIB = 2**30


@pytest.fixture(scope="module")
def model() -> Any:
    return llama(seed=0)


@pytest.fixture(autouse=True)
def own_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host ledger of KV-cache reservations of this test's engines only: other processes on the machine
    (and engines of earlier tests not yet collected) do not move the sizes these tests check."""
    monkeypatch.setattr(batch_size, "claim_lock", lambda: tmp_path / "claim.lock")
    return tmp_path / "claim.lock"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_sequence_are_what_the_kv_cache_allocates(dtype: torch.dtype) -> None:
    model = llama(seed=0).to(dtype)
    runner = LlamaRunner(model, 3, 64)
    try:
        null_block = batch_size.kv_cache_bytes_per_token(model.config, dtype) * BLOCK_SIZE
        assert batch_size.kv_cache_bytes_per_sequence(model.config, dtype, 64) * 3 + null_block == runner.cache.nbytes
    finally:
        runner.close()


def test_auto_size_grows_with_memory_and_never_leaves_its_bounds() -> None:
    per_sequence = 72 * MIB  # the mid model in float32 at 2048 tokens
    for device in ("cpu", "cuda"):
        sizes = [auto_batch_size(per_sequence, gib * GIB, device) for gib in range(0, 200)]
        assert sizes == sorted(sizes), f"{device}: not monotone in memory"
        assert sizes[0] == 1 and sizes[-1] == MAX_AUTO_BATCH[device]
        assert MIN_AUTO_BATCH in sizes


@pytest.mark.parametrize(("device", "available", "expected"), [
    ("cpu", 24 * GIB, int(24 * GIB * MEMORY_SHARE["cpu"]) // (72 * MIB)),  # within bounds: the share decides
    ("cpu", 1024 * GIB, MAX_AUTO_BATCH["cpu"]),  # plenty: the device's cap
    ("cuda", 1024 * GIB, MAX_AUTO_BATCH["cuda"]),
    ("cpu", 2 * GIB, MIN_AUTO_BATCH),  # the share holds fewer than 16, all of it holds 28: never under 16
    ("cpu", 10 * 72 * MIB + 1, 10),  # not even 16 fit in all of it: as many as do
    ("cpu", 100, 1),  # nothing fits: one sequence, and the allocation says what is missing
    ("cpu", None, MIN_AUTO_BATCH),  # unknown memory (another device type): the old default
])
def test_auto_size_clamps(device: str, available: int | None, expected: int) -> None:
    assert auto_batch_size(72 * MIB, available, device) == expected


def test_a_given_size_wins_and_zero_or_none_is_sized_from_memory(model: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    per_sequence = batch_size.kv_cache_bytes_per_sequence(model.config, torch.float32, 64)
    null_block = batch_size.kv_cache_bytes_per_token(model.config, torch.float32) * BLOCK_SIZE
    free = 40 * per_sequence / MEMORY_SHARE["cpu"]  # the share holds 40 full contexts
    monkeypatch.setattr(batch_size, "available_memory_bytes", lambda device: int(free))
    for given in (None, 0):
        eng = Engine(model, tokenizer(), max_batch_size=given, max_context=64)
        try:
            assert eng.max_batch_size == MAX_AUTO_BATCH["cpu"] and eng.batch_sizing.auto
            assert eng.batch_sizing.kv_tokens == 40 * 64
            assert eng.kv_cache_bytes == 40 * per_sequence + null_block
        finally:
            eng.close()
    eng = Engine(model, tokenizer(), max_batch_size=3, max_context=64)
    try:
        assert eng.max_batch_size == 3 and not eng.batch_sizing.auto
        assert eng.kv_cache_bytes == 3 * per_sequence + null_block
    finally:
        eng.close()
    with pytest.raises(BadRequest, match="max_batch_size must be an integer >= 1, or 0 or None"):
        Engine(model, tokenizer(), max_batch_size=-1, max_context=64)


def test_the_engine_logs_the_batch_size_it_chose(model: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="lockstep.engine.engine"):
        Engine(model, tokenizer(), max_batch_size=0, max_context=64).close()
        Engine(model, tokenizer(), max_batch_size=5, max_context=64).close()
    lines = [r.getMessage() for r in caplog.records]
    assert any("max batch size" in line and "(auto:" in line and "free)" in line for line in lines), lines
    assert any("max batch size 5 (configured)" in line for line in lines), lines


# ------------------------------------------------------------------------------------------- memory found
def cgroup_v2(root: Path, limit: str, current: int, inactive_file: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory.max").write_text(limit + "\n")
    (root / "memory.current").write_text(f"{current}\n")
    (root / "memory.stat").write_text(f"anon 1\nfile 2\ninactive_file {inactive_file}\nactive_file 3\n")
    return root


def test_a_container_limit_bounds_the_memory_found(tmp_path: Path) -> None:
    v2 = cgroup_v2(tmp_path / "v2", str(8 * GIB), current=3 * GIB, inactive_file=1 * GIB)
    assert batch_size.cgroup_headroom_bytes(v2) == 6 * GIB  # reclaimable page cache counts as free
    assert batch_size.host_available_bytes(v2) <= 6 * GIB
    over = cgroup_v2(tmp_path / "over", str(GIB), current=2 * GIB, inactive_file=0)
    assert batch_size.cgroup_headroom_bytes(over) == 0
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{4 * GIB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{GIB}\n")
    (v1 / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {GIB // 2}\n")
    assert batch_size.cgroup_headroom_bytes(tmp_path / "v1") == 4 * GIB - GIB // 2


def test_no_container_limit_leaves_the_os_figure(tmp_path: Path) -> None:
    assert batch_size.cgroup_headroom_bytes(cgroup_v2(tmp_path / "max", "max", current=GIB, inactive_file=0)) is None
    unlimited_v1 = tmp_path / "v1" / "memory"
    unlimited_v1.mkdir(parents=True)
    (unlimited_v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (unlimited_v1 / "memory.usage_in_bytes").write_text(f"{GIB}\n")
    assert batch_size.cgroup_headroom_bytes(tmp_path / "v1") is None
    assert batch_size.cgroup_headroom_bytes(tmp_path / "nothing") is None
    assert batch_size.host_available_bytes(tmp_path / "nothing") > 0


def test_memory_found_on_this_machine() -> None:
    free = batch_size.available_memory_bytes(torch.device("cpu"))
    assert free is not None and free > 0
    assert batch_size.available_memory_bytes(torch.device("meta")) is None


def test_short_requests_batch_beyond_the_full_contexts_the_cache_holds(model: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache with room for two full contexts runs eight short requests at once (a block each), a full-context
    request waits for room, and every answer is still HF's greedy one."""
    per_sequence = batch_size.kv_cache_bytes_per_sequence(model.config, torch.float32, 64)
    monkeypatch.setattr(batch_size, "available_memory_bytes", lambda device: 2 * per_sequence + 1)
    eng = Engine(model, tokenizer(), max_context=64)
    widths: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: widths.append(int(args[0].shape[0])))
    try:
        assert eng.batch_sizing.kv_tokens == 2 * 64 and eng.max_batch_size == MAX_AUTO_BATCH["cpu"]
        prompts = [encode(text)[:5] for text in CORPUS] * 2  # 12 prompts of at most 5 tokens: one block each
        long_prompt = encode(CORPUS[0])[:40]
        handles = [eng.submit(p, SamplingParams(max_new_tokens=10)) for p in prompts]
        handles.append(eng.submit(long_prompt, SamplingParams(max_new_tokens=64 - len(long_prompt))))
        eng.start()
        results = [h.result(60.0) for h in handles]
        for prompt, final in zip(prompts, results, strict=False):
            assert list(final.token_ids) == hf_greedy(model, prompt, 10)
        assert list(results[-1].token_ids) == hf_greedy(model, long_prompt, 64 - len(long_prompt))
        assert max(widths) == 8  # the eight free blocks, never more: 4x the two full contexts
    finally:
        hook.remove()
        eng.close()


# ------------------------------------------------------------------------------------------- host ledger
def test_engines_on_a_host_size_against_what_the_others_reserved(tmp_path: Path, model: Any) -> None:
    """A CPU cache's pages are written only as sequences use them, so the OS does not count a new cache: each
    engine records its own, and the next one sizes against it until it is withdrawn."""
    lock = tmp_path / "claim.lock"
    cpu = torch.device("cpu")
    with batch_size.memory_claim(cpu, lock_path=lock) as claim:
        assert claim.reserved_bytes == 0
        first = claim.reserve(3 * GIB)
        second = claim.reserve(GIB)
    assert first is not None and second is not None
    with batch_size.memory_claim(cpu, lock_path=lock) as claim:
        assert claim.reserved_bytes == 4 * GIB
        free = batch_size.available_memory_bytes(cpu)
        sized = batch_size.size_batch(None, model.config, torch.float32, cpu, 512,
                                      reserved_bytes=claim.reserved_bytes)
        assert free is not None and sized.available_bytes is not None
        assert sized.available_bytes <= max(0, free - 4 * GIB + 256 * MIB)  # the OS figure moves a little
    first.withdraw()
    with batch_size.memory_claim(cpu, lock_path=lock) as claim:
        assert claim.reserved_bytes == GIB
    # A process that died reserves nothing, whatever its line says.
    ledger = lock.with_suffix(".ledger")
    ledger.write_text(ledger.read_text() + "999999999-deadbeef 7\nnot a line\n")
    with batch_size.memory_claim(cpu, lock_path=lock) as claim:
        assert claim.reserved_bytes == GIB
    second.withdraw()
    with batch_size.memory_claim(cpu, lock_path=lock) as claim:
        assert claim.reserved_bytes == 0
    with batch_size.memory_claim(torch.device("meta"), lock_path=lock) as claim:  # no host ledger off the CPU
        assert claim.reserved_bytes == 0 and claim.reserve(GIB) is None


def test_an_engine_records_its_cache_and_withdraws_it_when_closed_or_collected(own_ledger: Path,
                                                                                 model: Any) -> None:
    import gc

    def reserved() -> int:
        with batch_size.memory_claim(torch.device("cpu"), lock_path=own_ledger) as claim:
            return claim.reserved_bytes

    engine = Engine(model, tokenizer(), max_batch_size=2, max_context=64)
    assert reserved() == engine.kv_cache_bytes > 0 and own_ledger.with_suffix(".ledger").exists()
    auto = Engine(model, tokenizer(), max_context=64)
    assert reserved() == engine.kv_cache_bytes + auto.kv_cache_bytes
    engine.close()
    assert reserved() == auto.kv_cache_bytes
    del auto
    gc.collect()
    assert reserved() == 0


def test_an_engine_collected_while_this_thread_holds_the_claim_is_dropped_at_the_next_one(own_ledger: Path,
                                                                                          model: Any) -> None:
    """The garbage collector may run a finalizer anywhere, inside a claim too: it must not wait on that lock."""
    import gc

    cpu = torch.device("cpu")
    engine = Engine(model, tokenizer(), max_batch_size=2, max_context=64)
    with batch_size.memory_claim(cpu, lock_path=own_ledger) as claim:
        assert claim.reserved_bytes == engine.kv_cache_bytes > 0
        del engine
        gc.collect()  # the engine's finalizer runs here
    with batch_size.memory_claim(cpu, lock_path=own_ledger) as claim:
        assert claim.reserved_bytes == 0
    assert own_ledger.with_suffix(".ledger").read_text() == ""
