"""VllmEngine against real vLLM (CPU) on the built-in tiny models; skipped where vLLM is not importable.

Run with the vLLM venv: ``/opt/vllm-venv/bin/python -m pytest tests/engine/vllm``. Engines start with
``enforce_eager`` (no torch.compile) in float32, the built-in engine's CPU dtype, so greedy ids compare exactly.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")

from lockstep.core.errors import BadRequest, LoadError, Overloaded  # noqa: E402
from lockstep.engine import Engine, FinalEvent, FinishReason, SamplingParams, TokenEvent  # noqa: E402
from lockstep.engine.vllm import VllmConfig, VllmEngine, VllmFinalEvent  # noqa: E402

pytestmark = pytest.mark.timeout(1200)  # an engine start takes 1-3 min on 2 busy cores
PROMPTS = ["The cat", "Once upon a time", "1 2 3 4", "Colours: red,"]


def _config(path: Path, **kw: object) -> VllmConfig:
    return VllmConfig(path, dtype="float32", enforce_eager=True, kv_cache_gib=0.25, max_context=512,
                      shutdown_timeout_s=2.0, **kw)  # type: ignore[arg-type]


def _builtin_greedy(path: Path, prompts: list[list[int]], n: int) -> list[tuple[int, ...]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(path)).start()
    try:
        return [engine.generate(ids, SamplingParams(max_new_tokens=n), timeout=60).token_ids for ids in prompts]
    finally:
        engine.close()


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in _alive(pids):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


@pytest.fixture(scope="module")
def engine(tiny_dirs: dict[int, Path]) -> Iterator[VllmEngine]:
    eng = VllmEngine(_config(tiny_dirs[0], weight_version="0")).start()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompt_ids(engine: VllmEngine) -> list[list[int]]:
    return [engine.tokenizer(p)["input_ids"] for p in PROMPTS]


def test_greedy_ids_equal_the_builtin_engine(engine: VllmEngine, tiny_dirs: dict[int, Path],
                                             prompt_ids: list[list[int]]) -> None:
    want = _builtin_greedy(tiny_dirs[0], prompt_ids, 24)
    got = [engine.generate(ids, SamplingParams(max_new_tokens=24), timeout=60) for ids in prompt_ids]
    assert [g.token_ids for g in got] == want
    for g in got:
        assert isinstance(g, VllmFinalEvent) and g.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert g.weight_versions == (("0", 0, g.completion_tokens),)


def test_stream_from_another_event_loop(engine: VllmEngine, prompt_ids: list[list[int]]) -> None:
    async def read() -> tuple[list[TokenEvent], FinalEvent]:
        handle = engine.submit(prompt_ids[0], SamplingParams(max_new_tokens=12, ignore_eos=True))
        tokens: list[TokenEvent] = []
        async for ev in handle.aiter():
            if isinstance(ev, TokenEvent):
                tokens.append(ev)
            else:
                return tokens, ev
        raise AssertionError("no final event")

    tokens, final = asyncio.run(read())
    assert final.finish_reason is FinishReason.LENGTH and final.completion_tokens == 12
    assert tuple(t for ev in tokens for t in ev.token_ids) == final.token_ids
    assert "".join(ev.text for ev in tokens) == final.text
    assert final.ttft_s is not None and 0 < final.ttft_s <= final.latency_s


def test_cancel_frees_the_request(engine: VllmEngine, prompt_ids: list[list[int]]) -> None:
    handle = engine.submit(prompt_ids[1], SamplingParams(max_new_tokens=400, ignore_eos=True))
    seen = 0
    for ev in handle:
        seen += 1
        if seen == 3:
            handle.cancel()
        if isinstance(ev, FinalEvent):
            break
    final = handle.result(30)
    assert final.finish_reason is FinishReason.CANCELLED
    assert 3 <= final.completion_tokens < 400
    assert engine.wait_idle(10) and engine.running == 0 and engine.queue_depth == 0


def test_a_request_cancelled_as_soon_as_it_is_submitted_is_settled_and_frees_its_place(
        engine: VllmEngine, prompt_ids: list[list[int]]) -> None:
    """As when an answer of an n > 1 request is refused (429) and the ones admitted before it are cancelled: the
    cancel reaches the loop before the request's task first runs. Before, such a request stayed queued forever."""
    handles = []
    for _ in range(64):
        handle = engine.submit(prompt_ids[2], SamplingParams(max_new_tokens=8))
        handle.cancel()
        handles.append(handle)
    finals = [h.result(30) for h in handles]
    assert all(f.finish_reason in (FinishReason.CANCELLED, FinishReason.LENGTH, FinishReason.STOP) for f in finals)
    assert engine.wait_idle(30) and engine.queue_depth == 0 and engine.running == 0
    assert engine.generate(prompt_ids[0], SamplingParams(max_new_tokens=4), timeout=60).completion_tokens == 4


def test_an_engine_that_cannot_start_says_why(tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    """vLLM's engine process logs the cause and the parent raises "initialization failed": the error says both."""
    import json
    import shutil

    folder = tmp_path / "long-context"
    shutil.copytree(tiny_dirs[2], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4_000_000}))
    engine = VllmEngine(VllmConfig(folder, dtype="float32", enforce_eager=True, kv_cache_gib=0.25,
                                   max_context=4_000_000, shutdown_timeout_s=2.0))
    with pytest.raises(LoadError, match="KV cache is needed, which is larger than the available") as failed:
        engine.start()
    assert "initialization failed" in str(failed.value) and engine.last_error is not None
    assert "KV cache" in engine.last_error


def test_bad_requests_and_429(engine: VllmEngine, prompt_ids: list[list[int]]) -> None:
    with pytest.raises(BadRequest):
        engine.submit([], SamplingParams())
    with pytest.raises(BadRequest, match="vocabulary"):
        engine.submit([10**6], SamplingParams())
    with pytest.raises(BadRequest, match="context limit"):
        engine.submit(prompt_ids[0], SamplingParams(max_new_tokens=600))
    engine.max_queue = 1
    try:
        first = engine.submit(prompt_ids[0], SamplingParams(max_new_tokens=4))
        with pytest.raises(Overloaded):
            for _ in range(20):  # until one lands while the first still waits for its first token
                engine.submit(prompt_ids[0], SamplingParams(max_new_tokens=4)).result(30)
        first.result(30)
    finally:
        engine.max_queue = 256


def test_inplace_reload_serves_the_new_weights(engine: VllmEngine, tiny_dirs: dict[int, Path],
                                               prompt_ids: list[list[int]]) -> None:
    want_s1 = _builtin_greedy(tiny_dirs[1], prompt_ids, 16)
    before = [engine.generate(ids, SamplingParams(max_new_tokens=16), timeout=60).token_ids for ids in prompt_ids]
    assert before != want_s1
    running = engine.submit(prompt_ids[1], SamplingParams(max_new_tokens=120, ignore_eos=True))
    next(iter(running))  # it is generating on the old weights
    pause = engine.reload_weights(tiny_dirs[1], version="1", drain_timeout_s=120)
    old = running.result(30)
    assert isinstance(old, VllmFinalEvent) and old.finish_reason is FinishReason.LENGTH
    assert old.weight_versions == (("0", 0, 120),), "a request admitted before the reload finishes on v0"
    after = [engine.generate(ids, SamplingParams(max_new_tokens=16), timeout=60) for ids in prompt_ids]
    assert [a.token_ids for a in after] == want_s1
    assert all(isinstance(a, VllmFinalEvent) and {v for v, _, _ in a.weight_versions} == {"1"} for a in after)
    assert engine.weight_version == "1"
    print(f"in-place reload pause (incl. drain of a 120-token request): {pause:.3f} s")
    engine.reload_weights(tiny_dirs[0], version="0")
    back = [engine.generate(ids, SamplingParams(max_new_tokens=16), timeout=60).token_ids for ids in prompt_ids]
    assert back == before


def test_two_engines_side_by_side_then_first_closed(engine: VllmEngine, tiny_dirs: dict[int, Path],
                                                    prompt_ids: list[list[int]]) -> None:
    """Swap mode: a second engine starts while the first serves; closing the first returns its memory."""
    a_pids = engine.child_pids
    assert {psutil.Process(p).name() for p in _alive(a_pids)} == {"VLLM::EngineCore", "VLLM::Worker"}
    busy = engine.submit(prompt_ids[0], SamplingParams(max_new_tokens=64, ignore_eos=True))
    started = time.monotonic()
    b = VllmEngine(_config(tiny_dirs[1], weight_version="1")).start()
    try:
        print(f"second engine started in {time.monotonic() - started:.1f} s beside the first")
        assert busy.result(60).finish_reason is FinishReason.LENGTH
        want_s1 = _builtin_greedy(tiny_dirs[1], prompt_ids[:2], 16)
        assert [b.generate(ids, SamplingParams(max_new_tokens=16), timeout=60).token_ids
                for ids in prompt_ids[:2]] == want_s1
        rss_a = _rss_mib(a_pids)
        closing = time.monotonic()
        engine.close()
        assert not _alive(a_pids), f"processes of the closed engine still run: {_alive(a_pids)}"
        print(f"closing the first engine took {time.monotonic() - closing:.1f} s and returned {rss_a:.0f} MiB "
              "(RSS of its processes)")
        assert [b.generate(ids, SamplingParams(max_new_tokens=16), timeout=60).token_ids
                for ids in prompt_ids[:2]] == want_s1
    finally:
        b.close()
    assert b.child_pids and not _alive(b.child_pids)


def test_no_orphans_when_killed_while_loading(tiny_dirs: dict[int, Path]) -> None:
    """SIGKILL the process while its vLLM engine loads: the watchdog kills the engine's processes."""
    child = subprocess.Popen([sys.executable, str(Path(__file__).with_name("kill_while_loading.py")),
                              str(tiny_dirs[0])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        engine_core = False
        while time.monotonic() < deadline and not engine_core:
            for p in psutil.Process(child.pid).children(recursive=True):
                seen.add(p.pid)
                try:
                    engine_core = engine_core or p.name().startswith("VLLM::EngineCore")
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)
        assert engine_core, "the engine process never appeared"
        time.sleep(1.0)  # let the watchdog poll once more
        seen |= {p.pid for p in psutil.Process(child.pid).children(recursive=True)}
    finally:
        child.kill()
        child.wait(10)
    deadline = time.monotonic() + 20
    while _alive(sorted(seen)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(sorted(seen)), f"orphans left behind: {_alive(sorted(seen))}"
