"""``VllmEngine``: the surface the replica uses from ``lockstep.engine.Engine``, on vLLM's ``AsyncLLM``.

- ``submit(prompt_ids, SamplingParams) -> RequestHandle`` (the built-in engine's handle: sync or ``async for``
  events, ``cancel()``), ``generate``, ``queue_depth`` / ``running`` (429 and metrics), ``stop`` / ``close``
  (close shuts vLLM's engine processes down: their memory goes back to the OS).
- ``reload_weights(path, version)``: the in-place update through vLLM's own path — ``pause_generation(mode=
  "wait")`` (admitted requests finish on the old weights, new ones wait inside vLLM), ``collective_rpc(
  "reload_weights", weights_path=...)``, ``update_weight_version``, ``resume_generation``.
- Each final event is a ``VllmFinalEvent`` that also carries vLLM's ``weight_versions`` spans: which weight
  version sampled which output tokens, a label check the replica can assert.

vLLM's engine lives on its own event loop in one thread of this process (its output handler is a task of that
loop); ``submit`` may be called from any thread or loop. vLLM runs the model in spawned processes, so a script
that creates a ``VllmEngine`` needs the ``if __name__ == "__main__":`` guard. A watchdog (``reaper``) kills those
processes if this one dies without shutting them down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockstep.core.errors import BadRequest, LoadError, NotReady, VerificationError
from lockstep.engine.engine import queue_full
from lockstep.engine.event import FinalEvent, FinishReason, TokenEvent
from lockstep.engine.request_handle import RequestHandle
from lockstep.engine.sampling_params import SamplingParams
from lockstep.engine.vllm.output_tail import OutputTail
from lockstep.engine.vllm.reaper import ensure_reaper

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED,
           "error": FinishReason.ERROR}
_ENV_LOCK = threading.Lock()  # env vars read by the engine processes vLLM spawns (inherited at spawn)
_LATENCY_EWMA_WEIGHT = 0.2


def vllm_available() -> bool:
    """True when vLLM can be imported here (the adapter is usable)."""
    return importlib.util.find_spec("vllm") is not None


def chosen_logprobs(tokens: tuple[int, ...], entries: Any) -> tuple[float, ...]:
    """The log-probability of each new token from vLLM's per-position candidates (NaN where it gave none)."""
    rows = list(entries or ())
    return tuple(float(rows[i][t].logprob) if i < len(rows) and rows[i] and t in rows[i] else math.nan
                 for i, t in enumerate(tokens))


def _vllm_collectors() -> list[Any]:
    """The ``vllm:*`` collectors in the process-wide Prometheus registry (right after an engine is created: its
    own, as each new engine unregisters the previous one's there and registers its own)."""
    from prometheus_client import REGISTRY

    by_collector = getattr(REGISTRY, "_collector_to_names", {})  # prometheus_client lists them no other way
    return [c for c, names in list(by_collector.items()) if any(n.startswith("vllm:") for n in names)]


def _is_dead(exc: BaseException) -> bool:
    """vLLM's EngineDeadError: its engine core process is gone (killed, crashed), so every request fails."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)


@dataclass(frozen=True)
class VllmFinalEvent(FinalEvent):
    """A final event plus vLLM's record of which weight version sampled which output tokens."""

    weight_versions: tuple[tuple[str, int, int], ...] = ()  # (version, first token, end token)


@dataclass(frozen=True)
class VllmConfig:
    """How one vLLM engine is built. Defaults suit the 2-core CPU box; ``extra`` passes any AsyncEngineArgs."""

    model: str | Path
    dtype: str = "bfloat16"
    max_batch_size: int | None = 16  # vLLM max_num_seqs (None: vLLM's default for the device)
    max_queue: int = 256  # requests waiting for their first token before submit() answers 429
    max_context: int = 2048  # vLLM max_model_len
    kv_cache_gib: float | None = 1.0  # KV cache GiB (CPU: always set it); None: from gpu_memory_utilization
    enforce_eager: bool = False  # True: no torch.compile (fast start; slower steps)
    omp_threads_bind: str | None = None  # CPU: VLLM_CPU_OMP_THREADS_BIND ("auto", "0-1", "nobind")
    reserved_cpus: int | None = None  # CPU: VLLM_CPU_NUM_OF_RESERVED_CPU (auto keeps 1 core for the frontend)
    served_model_name: str = "lockstep"  # the model_name label of vLLM's Prometheus metrics
    weight_version: str = "default"  # vLLM's weight version label at start (e.g. the Lockstep version)
    shutdown_timeout_s: float = 5.0  # grace before vLLM force-kills its engine processes
    extra: dict[str, Any] = field(default_factory=dict)

    def engine_args(self) -> Any:
        from vllm import AsyncEngineArgs

        kwargs: dict[str, Any] = dict(
            model=str(self.model), dtype=self.dtype, max_model_len=self.max_context,
            served_model_name=self.served_model_name, enforce_eager=self.enforce_eager,
        )
        if self.max_batch_size is not None:
            kwargs["max_num_seqs"] = self.max_batch_size
        if self.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
        # A token's log-probability in the distribution it was drawn from (temperature, top-k, top-p applied), as
        # the builtin engine reports it: what an importance-sampling correction compares the trainer's against.
        kwargs["logprobs_mode"] = "processed_logprobs"
        self.check_options(self.extra)
        kwargs.update(self.extra)
        return AsyncEngineArgs(**kwargs)

    @staticmethod
    def check_options(extra: dict[str, Any]) -> None:
        """BadRequest naming the options vLLM's AsyncEngineArgs does not have (and those it has)."""
        from vllm import AsyncEngineArgs

        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise BadRequest(f"vLLM has no engine option(s) {', '.join(unknown)}; AsyncEngineArgs takes: "
                             f"{', '.join(sorted(known))}")

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.omp_threads_bind is not None:
            out["VLLM_CPU_OMP_THREADS_BIND"] = self.omp_threads_bind
        if self.reserved_cpus is not None:
            out["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.reserved_cpus)
        return out


@dataclass
class _Request:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    submitted_at: float
    task: asyncio.Task[None] | None = None
    first_token_at: float | None = None


class VllmEngine:
    """One model version on one vLLM ``AsyncLLM``; ``start()`` blocks until vLLM serves (or raises LoadError)."""

    def __init__(self, config: VllmConfig) -> None:
        self.config = config
        self.max_batch_size = config.max_batch_size
        self.max_queue = config.max_queue
        self.max_context = config.max_context
        self.backend = "vllm"
        self.last_error: str | None = None
        self.start_seconds: float | None = None
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._vocab_size = 0
        self._lock = threading.Lock()  # guards the fields below
        self._requests: dict[int, _Request] = {}
        self._waiting = 0  # submitted, no token yet
        self._ids = itertools.count(1)
        self._submitted = 0
        self._generated_tokens = 0
        self._finished: Counter[str] = Counter()
        self._latency_ewma_s: float | None = None
        self._stopping = False
        self.failure: str | None = None  # why this engine can serve no more (vLLM's process died), once it cannot
        # Its vllm:* metric collectors. vLLM keeps them in the process-wide registry, where the next engine
        # created (a staged version's) replaces them: the replica's /metrics reads the serving engine's here.
        self.prometheus_collectors: list[Any] = []
        self._closed = False
        self._idle = threading.Condition(self._lock)
        self._child_pids: list[int] = []
        self._compares = 0  # prompt-logprobs requests sent: their ids

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> VllmEngine:
        """Start vLLM's engine processes and load the model (blocking). Returns self."""
        if self._thread is not None:
            return self
        ensure_reaper()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lockstep-vllm", daemon=True)
        self._thread.start()
        started = time.monotonic()
        tail = OutputTail()
        try:
            self._call(self._create(tail))
        except Exception as exc:
            said = tail.cause()  # the engine process logs the cause; the exception here only says that it failed
            self.last_error = f"{type(exc).__name__}: {exc}" + (f" (vLLM's engine process: {said})" if said else "")
            self._stop_loop()
            raise LoadError(f"vLLM could not start {self.config.model}: {self.last_error}") from exc
        self.start_seconds = time.monotonic() - started
        return self

    async def _create(self, tail: OutputTail) -> None:
        from transformers import AutoConfig, AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.config.engine_args()
        before = _descendants()
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in self.config.env()}
            os.environ.update(self.config.env())
            try:
                with tail:
                    self._llm = AsyncLLM.from_engine_args(args)
                self.prometheus_collectors = _vllm_collectors()  # this engine's: it registered them just now
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        self._child_pids = sorted(_vllm_processes(_descendants() - before))
        if self.config.weight_version != "default":
            await self._llm.update_weight_version(self.config.weight_version)
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.config.model))
        self._vocab_size = int(AutoConfig.from_pretrained(str(self.config.model)).vocab_size)

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting work; drain=True lets admitted requests finish (up to ``timeout`` s, then cancels).
        True when nothing had to be cancelled."""
        with self._lock:
            self._stopping = True
            if drain:
                self._idle.wait_for(lambda: not self._requests, timeout=timeout)
            left = list(self._requests.values())
        for req in left:
            req.handle.cancel()
        with self._lock:
            self._idle.wait_for(lambda: not self._requests, timeout=10.0)
        return not left

    def close(self) -> None:
        """Stop without draining and shut vLLM down: its processes exit and their memory is returned."""
        if self._closed:
            return
        self.stop(drain=False)
        self._closed = True
        llm, self._llm = self._llm, None
        if llm is not None:
            # On the loop thread: vLLM cancels its output-handler task there.
            self._call(_shutdown(llm, self.config.shutdown_timeout_s))
        self._stop_loop()
        self._tokenizer = None
        _reap(self._child_pids, timeout=10.0)  # the memory is back once these are gone

    def _stop_loop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        if self._thread is None or not self._thread.is_alive():
            raise NotReady("this vLLM engine is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # --- admission -------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Iterable[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; BadRequest for an invalid one, Overloaded when ``max_queue`` wait for a first token."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise BadRequest(f"params must be SamplingParams, got {type(params).__name__}")
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise BadRequest("the prompt is empty; at least one token is required")
        out_of_range = [t for t in ids if not 0 <= t < self._vocab_size]
        if out_of_range:
            raise BadRequest(f"token ids {out_of_range[:5]} are outside the vocabulary [0, {self._vocab_size})")
        total = len(ids) + params.max_new_tokens
        if total > self.max_context:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} tokens "
                f"exceeds the context limit of {self.max_context} tokens; shorten the prompt or lower "
                "max_new_tokens")
        with self._lock:
            if self._stopping or self._closed or self._llm is None:
                raise NotReady("this engine is stopping and accepts no new requests")
            if self._waiting >= self.max_queue:
                raise queue_full(self._waiting, self.max_queue, self._latency_ewma_s)
            rid = next(self._ids)
            handle = RequestHandle(rid, len(ids), self._on_cancel)
            req = _Request(handle, ids, params, time.monotonic())
            self._requests[rid] = req
            self._waiting += 1
            self._submitted += 1
        self._loop.call_soon_threadsafe(self._spawn, rid)
        return handle

    def generate(self, prompt_ids: Iterable[int], params: SamplingParams | None = None,
                 timeout: float | None = None) -> FinalEvent:
        """Submit and wait for the final event (for scripts)."""
        return self.submit(prompt_ids, params).result(timeout)

    def _spawn(self, rid: int) -> None:  # on the loop
        req = self._requests.get(rid)
        if req is None:
            return
        req.task = self._loop.create_task(self._serve(rid, req))
        # A task cancelled before its first step never enters _serve, whose finally settles the request: then
        # this does, or the request would count as waiting forever (the queue fills with ghosts: 429 for all).
        req.task.add_done_callback(lambda _: self._settle(rid, req, FinishReason.CANCELLED))
        if req.handle.cancel_requested:
            req.task.cancel()

    def _on_cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            req = self._requests.get(handle.request_id)
        if req is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: req.task.cancel() if req.task is not None else None)

    async def _serve(self, rid: int, req: _Request) -> None:
        """Stream one request from vLLM into its handle; cancelling this task aborts it in vLLM."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = req.params
        vparams = VSamplingParams(
            max_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
            seed=p.seed, stop=list(p.stop) or None, ignore_eos=p.ignore_eos,
            logprobs=0 if p.logprobs else None,  # 0: the chosen token's only
            output_kind=RequestOutputKind.DELTA)
        tokens: list[int] = []
        logprobs: list[float] | None = [] if p.logprobs else None
        texts: list[str] = []
        reason: FinishReason = FinishReason.ERROR
        error: str | None = None
        spans: tuple[tuple[str, int, int], ...] = ()
        try:
            async for out in self._llm.generate({"prompt_token_ids": req.prompt_ids}, vparams,
                                                request_id=f"lockstep-{id(self)}-{rid}"):
                comp = out.outputs[0]
                new = tuple(int(t) for t in comp.token_ids)
                if new:
                    if req.first_token_at is None:
                        req.first_token_at = time.monotonic()
                        with self._lock:
                            self._waiting -= 1
                    tokens.extend(new)
                    texts.append(comp.text)
                    self._generated_tokens += len(new)
                    chosen = None
                    if logprobs is not None:
                        chosen = chosen_logprobs(new, comp.logprobs)
                        logprobs.extend(chosen)
                    req.handle._push(TokenEvent(new, comp.text, chosen))
                elif comp.text:  # text completed without a new token (a held-back stop prefix)
                    texts.append(comp.text)
                    req.handle._push(TokenEvent((), comp.text))
                if out.finished:
                    reason = _FINISH.get(str(comp.finish_reason), FinishReason.STOP)
                    spans = tuple((s.version, s.start, s.end) for s in (comp.weight_versions or ()))
        except asyncio.CancelledError:
            reason = FinishReason.CANCELLED  # vLLM's generate() aborted the request on its way out
        except Exception as exc:  # EngineDeadError, EngineGenerateError, a rejected request
            reason, error = FinishReason.ERROR, f"{type(exc).__name__}: {exc}"
            self.last_error = error
            if _is_dead(exc):  # vLLM's engine process is gone: no request will be served again
                with self._lock:
                    self.failure, self._stopping = f"vLLM's engine process died ({error})", True
        finally:
            self._settle(rid, req, reason, error=error, texts=texts, tokens=tokens, spans=spans, logprobs=logprobs,
                         engine_failed=self.failure is not None and reason is FinishReason.ERROR)

    def _settle(self, rid: int, req: _Request, reason: FinishReason, *, error: str | None = None,
                texts: Sequence[str] = (), tokens: Sequence[int] = (), spans: tuple[tuple[str, int, int], ...] = (),
                logprobs: Sequence[float] | None = None, engine_failed: bool = False) -> None:
        """End request ``rid``: out of the books, its final event sent; once only (later calls do nothing)."""
        now = time.monotonic()
        with self._lock:
            if self._requests.get(rid) is not req:
                return
            del self._requests[rid]
            if req.first_token_at is None:
                self._waiting -= 1
            self._finished[str(reason)] += 1
            latency = now - req.submitted_at
            prev = self._latency_ewma_s
            self._latency_ewma_s = latency if prev is None else prev + _LATENCY_EWMA_WEIGHT * (latency - prev)
            self._idle.notify_all()
        req.handle._push(VllmFinalEvent(
            finish_reason=reason, text="".join(texts), token_ids=tuple(tokens), prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(tokens),
            ttft_s=None if req.first_token_at is None else req.first_token_at - req.submitted_at,
            latency_s=now - req.submitted_at, error=error, weight_versions=spans,
            logprobs=None if logprobs is None else tuple(logprobs), engine_failed=engine_failed))

    def canary(self, prompt_ids: list[int], tokens: int = 4) -> None:
        """A short greedy generation through vLLM: it must run and every sampled token's logprob be finite."""
        self._call(self._canary(prompt_ids, tokens))

    async def _canary(self, prompt_ids: list[int], tokens: int) -> None:
        from vllm import SamplingParams as VSamplingParams

        params = VSamplingParams(max_tokens=tokens, temperature=0.0, logprobs=1, ignore_eos=True)
        final = None
        async for out in self._llm.generate({"prompt_token_ids": prompt_ids}, params,
                                            request_id=f"lockstep-canary-{id(self)}"):
            final = out
        comp = None if final is None else final.outputs[0]
        if comp is None or len(comp.token_ids) != tokens:
            raise VerificationError(f"the canary generation on {self.config.model} produced "
                                    f"{0 if comp is None else len(comp.token_ids)} of {tokens} tokens")
        for token, candidates in zip(comp.token_ids, comp.logprobs or (), strict=False):
            chosen = candidates.get(token)
            if chosen is None or not math.isfinite(chosen.logprob):
                raise VerificationError(f"the canary generation on {self.config.model} produced non-finite "
                                        "logits; the weights are corrupt or overflow in this dtype")

    @property
    def vocab_size(self) -> int:
        """The width of the model's next-token distribution (its config's ``vocab_size``)."""
        return self._vocab_size

    def prompt_logprobs(self, prompt_ids: list[int], k: int, timeout: float | None = None
                        ) -> list[dict[int, float] | None]:
        """Per position of ``prompt_ids``, the top-``k`` next-token log-probabilities and the actual token's (None
        at position 0); ``k`` is capped at vLLM's ``max_logprobs``. Compares two resident versions."""
        if self._llm is None:
            raise NotReady(f"the vLLM engine of {self.config.model} is not running")
        limit = int(self._llm.model_config.max_logprobs)
        return self._call(self._prompt_logprobs(prompt_ids, k if limit < 0 else min(k, limit)), timeout)  # type: ignore[no-any-return]

    async def _prompt_logprobs(self, prompt_ids: list[int], k: int) -> list[dict[int, float] | None]:
        from vllm import SamplingParams as VSamplingParams

        params = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        final = None
        self._compares += 1  # on the engine's loop: one at a time
        async for out in self._llm.generate({"prompt_token_ids": prompt_ids}, params,
                                            request_id=f"lockstep-compare-{id(self)}-{self._compares}"):
            final = out
        if final is None or final.prompt_logprobs is None:
            raise RuntimeError(f"vLLM of {self.config.model} returned no prompt logprobs")
        return [None if entry is None else {int(t): float(lp.logprob) for t, lp in entry.items()}
                for entry in final.prompt_logprobs]

    # --- in-place update -------------------------------------------------------------------------------
    def reload_weights(self, path: str | Path, version: str, drain_timeout_s: float | None = None) -> float:
        """Serve the weights in ``path`` (same architecture) from now on; returns the pause in seconds.

        Requests already running finish on the old weights first (vLLM pauses with mode="wait": new ones wait
        inside vLLM, none is rejected); prefix and KV caches are cleared, so nothing computed with the old
        weights is reused."""
        return float(self._call(self._reload(str(path), version), drain_timeout_s))

    async def _reload(self, path: str, version: str) -> float:
        started = time.monotonic()
        await self._llm.pause_generation(mode="wait", clear_cache=True)
        try:
            await self._llm.collective_rpc("reload_weights",
                                           kwargs={"weights_path": path, "is_checkpoint_format": True})
            await self._llm.update_weight_version(version)
        finally:
            await self._llm.resume_generation()
        return time.monotonic() - started

    @property
    def weight_version(self) -> str:
        return str(self._call(self._llm.get_weight_version()))

    # --- observability ---------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests submitted that have no token yet (waiting in vLLM's queue or being prefilled)."""
        return self._waiting

    @property
    def running(self) -> int:
        """Requests generating (at least one token out, not finished)."""
        return len(self._requests) - self._waiting

    @property
    def generated_tokens_total(self) -> int:
        return self._generated_tokens

    @property
    def requests_total(self) -> int:
        return self._submitted

    @property
    def finished_total(self) -> dict[str, int]:
        with self._lock:
            return dict(self._finished)

    @property
    def accepting(self) -> bool:
        return not (self._stopping or self._closed)

    @property
    def is_running(self) -> bool:
        return self._llm is not None and self._thread is not None and self._thread.is_alive()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def child_pids(self) -> list[int]:
        """The processes vLLM started for this engine (``VLLM::EngineCore``, ``VLLM::Worker``)."""
        return list(self._child_pids)

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: not self._requests, timeout=timeout)


async def _shutdown(llm: Any, timeout: float) -> None:
    llm.shutdown(timeout=timeout)


def _vllm_processes(pids: Iterable[int]) -> list[int]:
    """The vLLM engine processes among ``pids`` (not multiprocessing's resource tracker, shared by engines)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).name().startswith("VLLM"):
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _reap(pids: list[int], timeout: float) -> None:
    """Wait until ``pids`` have exited (vLLM SIGKILLs them on shutdown); kill what is still there. A zombie
    counts as gone: its memory is freed, and an orphan's is reaped by PID 1 (or, in a container, never)."""
    import psutil

    def alive() -> list[psutil.Process]:
        out = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in alive():
        try:
            p.kill()
        except psutil.Error:
            pass


def _descendants() -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()
