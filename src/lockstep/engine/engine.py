"""The generation engine: one loaded model, a background thread, continuous batching, streaming handles."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import BadRequest, NotReady, Overloaded
from lockstep.engine.batch_size import forget, memory_claim, size_batch
from lockstep.engine.event import NONFINITE_LOGITS, FinalEvent, FinishReason
from lockstep.engine.request_handle import RequestHandle
from lockstep.engine.runner import Runner, make_runner
from lockstep.engine.sampler import bad_rows, sample
from lockstep.engine.sampling_params import SamplingParams
from lockstep.engine.scheduler import Scheduler
from lockstep.engine.sequence import Sequence

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 2048  # tokens; caps the KV cache when the model allows more
# Prompt tokens prefilled per decode step while a batch runs, by device. On a CPU a prefill costs about
# 65 ms + 1.3 ms per token for the 116 M mid model against 80 ms for a 16-sequence decode step, so 32 tokens
# at most double a step; a GPU prefills thousands of tokens in the time of one memory-bound decode step.
STEP_PREFILL_TOKENS = {"cpu": 32, "cuda": 2048}
# A prompt longer than this is prefilled this many tokens per decode step while a batch runs, so it delays
# each step a little instead of stalling one step for its whole prefill (on a CPU, 1.3 ms per token).
PREFILL_CHUNK_TOKENS = {"cpu": 256, "cuda": 2048}
_LATENCY_EWMA_WEIGHT = 0.2  # weight of the newest request in the latency average behind Retry-After


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every end-of-sequence id the model's generation config or the tokenizer declares."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Iterable):
            ids.update(int(v) for v in value)
    return frozenset(ids)


MAX_RETRY_AFTER_S = 30


def queue_full(waiting: int, max_queue: int, latency_s: float | None) -> Overloaded:
    """The 429 of a full queue: how many wait, and when to retry, in the whole seconds ``Retry-After`` carries."""
    retry_s = 1 if latency_s is None else min(MAX_RETRY_AFTER_S, max(1, math.ceil(latency_s)))
    return Overloaded(f"the engine queue is full ({waiting} requests waiting, at most {max_queue}); retry after "
                      f"{retry_s} s", retry_after_s=retry_s)


class Engine:
    """Serves one model: ``submit`` from any thread, model work in one background thread.

    One engine per model version; nothing is shared between engines, so an old engine can drain
    while a new one serves.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int | None = None,
        max_queue: int = 256,
        max_context: int | None = None,
        backend: str = "auto",
        prefill_token_budget: int = 2048,
        interleave_prefill: bool = False,
        step_prefill_tokens: int | None = None,
        prefill_chunk_tokens: int | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        cfg = model.config
        if max_context is None:
            max_context = min(int(getattr(cfg, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT),
                              DEFAULT_MAX_CONTEXT)
        for name, value in (("max_queue", max_queue), ("max_context", max_context),
                            ("prefill_token_budget", prefill_token_budget)):
            if not isinstance(value, int) or value < 1:
                raise BadRequest(f"{name} must be an integer >= 1, got {value!r}")
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 0):
            raise BadRequest(f"max_batch_size must be an integer >= 1, or 0 or None to size it from memory, "
                             f"got {max_batch_size!r}")
        param = next(model.parameters())
        self._device = param.device
        self.max_queue = max_queue
        self.max_context = max_context
        if step_prefill_tokens is None:
            step_prefill_tokens = STEP_PREFILL_TOKENS.get(self._device.type, STEP_PREFILL_TOKENS["cuda"])
        if not isinstance(step_prefill_tokens, int) or step_prefill_tokens < 1:
            raise BadRequest(f"step_prefill_tokens must be an integer >= 1, got {step_prefill_tokens!r}")
        # While a batch decodes, newcomers are prefilled in waves of at most this many padded tokens per
        # step: a burst is spread over a few steps, so it neither stalls the running batch for long nor
        # finishes (and comes back) all at once. An idle engine admits up to prefill_token_budget at once.
        self.step_prefill_tokens = step_prefill_tokens
        self._step_prefill_left = 0
        if prefill_chunk_tokens is None:
            prefill_chunk_tokens = PREFILL_CHUNK_TOKENS.get(self._device.type, PREFILL_CHUNK_TOKENS["cuda"])
        if not isinstance(prefill_chunk_tokens, int) or prefill_chunk_tokens < 0:
            raise BadRequest(f"prefill_chunk_tokens must be an integer >= 0 (0: off), got {prefill_chunk_tokens!r}")
        # Requests that arrive while a batch decodes join the next step: their prompts go through the same
        # forward pass as its decode rows, so the weights are read once for both (on 2 CPU cores, mid at 64
        # clients: 196 against 138 tok/s). With interleave_prefill they are prefilled between the layers of the
        # running step instead: their first token comes sooner (TTFT p50 0.27 s against 0.70 s there), at one
        # more pass over the weights per wave (docs/benchmarks.md, issue 11).
        self.interleave_prefill = interleave_prefill
        self._model = model
        self._tokenizer = tokenizer
        self._clock = clock
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._eos = _eos_ids(model, tokenizer)
        # None or 0: sized from the memory free now. The KV cache is paged: a request reserves blocks for its
        # prompt plus max_new_tokens when admitted, so the batch follows what requests ask for, not the context.
        # Sized and recorded under a host-wide lock: replicas starting together each see what the others took.
        with memory_claim(self._device) as claim:
            self.batch_sizing = size_batch(max_batch_size, cfg, param.dtype, self._device, max_context,
                                           reserved_bytes=claim.reserved_bytes)
            self.max_batch_size = max_batch_size = self.batch_sizing.size
            with torch.inference_mode():
                self._runner: Runner | None = make_runner(model, max_batch_size, max_context, backend,
                                                          self.batch_sizing.kv_tokens)
            self._reservation = claim.reserve(self.kv_cache_bytes)
        # Withdrawn at close; an engine nobody closed is forgotten when collected.
        self._forget = (weakref.finalize(self, forget, self._reservation.key) if self._reservation is not None
                        else None)
        self.backend = self._runner.name
        log.info("engine: backend %s, %s, %s on %s, context %d tokens, KV cache %.0f MiB reserved", self.backend,
                 self.batch_sizing.describe(), param.dtype, self._device, max_context, self.kv_cache_bytes / 2**20)
        self.prefill_chunk_tokens = prefill_chunk_tokens if max_batch_size > 1 else 0  # needs a spare slot
        self._scheduler = Scheduler(max_batch_size, max_queue, prefill_token_budget, self._runner.reserve)
        self._cond = threading.Condition()  # guards the scheduler's queues, flags and counters
        self._thread: threading.Thread | None = None
        self._paused = False
        self._stopping = False
        self.failure: str | None = None  # why this engine can serve no more (its loop crashed), once it cannot
        self._abort = False
        self._closed = False
        self._stop_cancelled = 0  # requests cancelled because the engine stopped without finishing them
        self._ids = itertools.count(1)
        self._by_id: dict[int, Sequence] = {}
        self._submitted = 0
        self._generated_tokens = 0
        self._finished: Counter[str] = Counter()
        self._latency_ewma_s: float | None = None
        self.last_error: str | None = None

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the engine thread (idempotent). Returns self."""
        with self._cond:
            if self._closed or self._stopping:
                raise NotReady("this engine was stopped; create a new Engine to serve again")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lockstep-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting work; drain=True finishes every admitted request first (up to ``timeout``
        seconds, then cancels the rest), drain=False cancels them. True when nothing had to be cancelled."""
        with self._cond:
            self._stopping = True
            self._paused = False  # queued requests are admitted work: a drain finishes them too
            if not drain:
                self._abort = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            self._cancel_all()
        elif thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                with self._cond:
                    self._abort = True
                    self._cond.notify_all()
                thread.join()  # at most one more step
        return self._stop_cancelled == 0

    def close(self) -> None:
        """Stop without draining and release the KV cache and the model so their memory can be freed."""
        self.stop(drain=False)
        with self._cond:
            self._closed = True
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()
        if self._forget is not None and self._forget.detach() is not None and self._reservation is not None:
            self._reservation.withdraw()
        self._model = None
        self._tokenizer = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # --- admission -------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Iterable[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; BadRequest for an invalid one, Overloaded when the queue is full."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise BadRequest(f"params must be SamplingParams, got {type(params).__name__}")
        try:
            ids = [int(t) for t in prompt_ids]
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"prompt token ids must be integers: {exc}") from exc
        if not ids:
            raise BadRequest("the prompt is empty; at least one token is required")
        out_of_range = [t for t in ids if not 0 <= t < self._vocab_size]
        if out_of_range:
            raise BadRequest(
                f"token ids {out_of_range[:5]} are outside the vocabulary [0, {self._vocab_size})"
            )
        total = len(ids) + params.max_new_tokens
        if total > self.max_context:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} tokens "
                f"exceeds the context limit of {self.max_context} tokens; shorten the prompt or lower "
                "max_new_tokens"
            )
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self._device)
            if params.seed is None:
                generator.seed()  # fresh non-deterministic seed
            else:
                generator.manual_seed(params.seed)
        with self._cond:
            if self._stopping or self._closed:
                raise NotReady("this engine is stopping and accepts no new requests")
            if self._scheduler.queue_full:
                raise queue_full(self._scheduler.queued_for_slot, self.max_queue, self._latency_ewma_s)
            rid = next(self._ids)
            handle = RequestHandle(rid, len(ids), self._on_cancel)
            seq = Sequence(rid, ids, params, self._tokenizer, self._eos, generator, handle, self._clock)
            self._scheduler.add(seq)
            self._by_id[rid] = seq
            self._submitted += 1
            self._cond.notify_all()
        return handle

    def generate(self, prompt_ids: Iterable[int], params: SamplingParams | None = None,
                 timeout: float | None = None) -> FinalEvent:
        """Submit and wait for the final event (for scripts)."""
        return self.submit(prompt_ids, params).result(timeout)

    def pause_admission(self) -> None:
        """Keep queued requests queued; running ones continue (before an in-place weight update)."""
        with self._cond:
            self._paused = not self._stopping  # a draining stop must still admit what is queued

    def resume_admission(self) -> None:
        """Admit queued requests again."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is running; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._scheduler.running and self._scheduler.prefilling is None,
                                       timeout=timeout)

    # --- observability ---------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot."""
        return len(self._scheduler.waiting)

    @property
    def running(self) -> int:
        """Requests holding a batch slot (the current batch size, with a long prompt being prefilled)."""
        return len(self._scheduler.running) + (self._scheduler.prefilling is not None)

    @property
    def generated_tokens_total(self) -> int:
        """Tokens sampled since the engine was created."""
        return self._generated_tokens

    @property
    def requests_total(self) -> int:
        """Requests accepted by submit()."""
        return self._submitted

    @property
    def finished_total(self) -> dict[str, int]:
        """Finished requests per finish reason."""
        with self._cond:
            return dict(self._finished)

    @property
    def accepting(self) -> bool:
        """True until stop() or close(): submit() may be called."""
        return not (self._stopping or self._closed)

    @property
    def admission_paused(self) -> bool:
        return self._paused

    @property
    def is_running(self) -> bool:
        """True while the engine thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes reserved for the KV cache (0 for the generic path, whose caches grow per request)."""
        cache = getattr(self._runner, "cache", None)
        return cache.nbytes if cache is not None else 0

    # --- engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._step():
                    pass
        except BaseException as exc:  # a bug in the loop itself: fail what is left, never hang callers
            log.exception("engine loop crashed")
            self.last_error = f"{type(exc).__name__}: {exc}"
            with self._cond:
                self._stopping = True
            self.failure = f"the engine loop crashed: {self.last_error}"
            self._cancel_all(FinishReason.ERROR, f"engine failed: {self.last_error}", engine_failed=True)

    def _has_work(self) -> bool:
        s = self._scheduler
        return (self._abort or bool(s.running) or s.prefilling is not None
                or (bool(s.waiting) and not self._paused))

    def _step(self) -> bool:
        """One iteration: admit + prefill, then one batched decode step. False when the engine should exit."""
        with self._cond:
            while not self._has_work():
                if self._stopping and not self._scheduler.waiting:
                    return False
                self._cond.wait()  # idle: no spinning; submit/cancel/resume/stop notify
            abort = self._abort
        if abort:
            self._cancel_all()
            return False
        for seq in list(self._scheduler.running):
            if seq.handle.cancel_requested:
                self._end(seq, FinishReason.CANCELLED)
        chunked = self._scheduler.prefilling
        if chunked is not None and chunked.handle.cancel_requested:
            self._end_prefilling(chunked, FinishReason.CANCELLED)
        with self._cond:  # after the cancellations, so the slots they freed are given out now
            batch = list(self._scheduler.running)
            admitted = [] if self._paused or self._abort else self._admit_at_step_start()
        fused = bool(batch and admitted)  # the newcomers' prefill rides on the batch's decode step
        if fused:
            self._fused_step(batch, admitted)
        elif admitted:
            self._prefill(admitted)
        if self._scheduler.prefilling is not None:
            self._prefill_chunk(whole=not self._scheduler.running)  # idle: nobody to keep waiting
        if not fused and self._scheduler.running:
            self._decode(list(self._scheduler.running))
        return True

    def _fused_step(self, batch: list[Sequence], admitted: list[Sequence]) -> None:
        """The batch's decode step and the newcomers' prefill in one forward pass (one read of the weights)."""
        assert self._runner is not None
        assert all(seq.slot == i for i, seq in enumerate(batch)), "running sequences are not compact"
        try:
            logits = self._runner.step([s.output_ids[-1] for s in batch], [s.num_cached for s in batch],
                                       [s.prompt_ids for s in admitted], [s.slot for s in admitted])
        except Exception as exc:
            # Apart, each path finds its own culprit: only a request whose own forward fails ends.
            log.warning("fused step failed for %d + %d requests (%s: %s); prefilling and decoding apart",
                        len(batch), len(admitted), type(exc).__name__, exc)
            self._prefill(admitted)  # slots after the batch's: the batch stays where it is
            self._decode(batch)
            return
        for seq in batch:
            seq.num_cached += 1
        for seq in admitted:
            seq.num_cached = len(seq.prompt_ids)
        self._sample(batch + admitted, logits)

    def _prefill(self, seqs: list[Sequence]) -> None:
        assert self._runner is not None
        try:
            logits = self._runner.prefill([s.prompt_ids for s in seqs], [s.slot for s in seqs])
        except Exception as exc:
            if len(seqs) > 1:  # find the culprit: only the request that breaks the forward fails
                for seq in seqs:
                    self._prefill([seq])
                return
            log.exception("prefill failed for request %d", seqs[0].request_id)
            self._end(seqs[0], FinishReason.ERROR, f"prefill failed: {type(exc).__name__}: {exc}", dirty=True)
            return
        for seq in seqs:
            seq.num_cached = len(seq.prompt_ids)
        self._sample(seqs, logits)

    def _admit_at_step_start(self) -> list[Sequence]:
        """An idle engine admits up to the prefill budget at once. While a batch decodes, newcomers join
        through the step's interleave points instead (a wave within the step budget), and start decoding at
        the next step: every wave then keeps its own step and waves never merge into one burst."""
        s = self._scheduler
        self._step_prefill_left = self.step_prefill_tokens
        if not s.running:
            return s.admit()
        if self.prefill_chunk_tokens:
            s.start_prefilling(self.prefill_chunk_tokens)
        if self.interleave_prefill:
            return []
        admitted = s.admit(self.step_prefill_tokens, longest=self.prefill_chunk_tokens or None)
        self._step_prefill_left -= s.padded_tokens(admitted)
        return admitted

    def _prefill_chunk(self, whole: bool) -> None:
        """The next chunk of the long prompt in the last slot (all of it when ``whole``); once the prompt is
        cached, the sequence moves into the batch's next slot and gets its first token."""
        assert self._runner is not None
        seq = self._scheduler.prefilling
        assert seq is not None
        start = seq.num_cached
        end = len(seq.prompt_ids) if whole else min(len(seq.prompt_ids), start + self.prefill_chunk_tokens)
        try:
            logits = self._runner.prefill_chunk(seq.prompt_ids[start:end], seq.slot, start)
        except Exception as exc:
            log.exception("chunked prefill failed for request %d", seq.request_id)
            self._end_prefilling(seq, FinishReason.ERROR, f"prefill failed: {type(exc).__name__}: {exc}", dirty=True)
            return
        seq.num_cached = end
        if end < len(seq.prompt_ids):
            return
        with self._cond:
            move = self._scheduler.join_prefilled(seq)
        self._runner.move(move.src, move.dst, move.length)
        self._sample([seq], logits)

    def _end_prefilling(self, seq: Sequence, reason: FinishReason, error: str | None = None,
                        dirty: bool = False) -> None:
        """Finish the sequence being prefilled in chunks (cancelled, or its forward failed)."""
        assert self._runner is not None
        seq.finish(reason, error)
        self._runner.release(seq.slot, dirty)
        with self._cond:
            self._scheduler.prefilling = None
            seq.slot = -1
            self._record_finish(seq)
            self._cond.notify_all()

    def _prefill_arrivals(self) -> None:
        """Inside a decode step: admit and prefill what arrived since it began (slots after the step's batch).

        Sequences prefilled here join the next step; one that ends at once gives its slot to another
        newcomer, never to a member of the running step, so the step's slots stay where it expects them.
        """
        s = self._scheduler
        left = self._step_prefill_left
        if (left <= 0 or not s.waiting or self._paused or self._abort
                or len(s.running) >= s.capacity):
            return  # the common case, read without the lock: a stale answer only defers to the next step
        with self._cond:
            if self._paused or self._abort:
                return
            # The first wave of a step may exceed the budget with one long prompt (never starved).
            admitted = s.admit(left, at_least_one=left == self.step_prefill_tokens,
                               longest=self.prefill_chunk_tokens or None)
            self._step_prefill_left = left - s.padded_tokens(admitted)
        if admitted:
            self._prefill(admitted)

    def _decode(self, batch: list[Sequence]) -> None:
        assert self._runner is not None
        assert all(seq.slot == i for i, seq in enumerate(batch)), "running sequences are not compact"
        interleave = self._prefill_arrivals if self.interleave_prefill else None
        try:
            logits = self._runner.decode([s.output_ids[-1] for s in batch], [s.num_cached for s in batch],
                                         interleave)
        except Exception as exc:
            # One request may have broken the batched step, or the step failed as a whole (out of memory at this
            # width): each sequence steps alone, so only a request whose own step fails ends.
            log.warning("decode step failed for %d requests (%s: %s); stepping each alone", len(batch),
                        type(exc).__name__, exc)
            self._decode_each(batch)
            return
        for seq in batch:
            seq.num_cached += 1
        self._sample(batch, logits)

    def _decode_each(self, batch: list[Sequence]) -> None:
        """After a failed batched step: the same step for each sequence alone; one that fails again ends."""
        assert self._runner is not None
        stepped: list[Sequence] = []
        rows: list[torch.Tensor] = []
        failed: list[tuple[Sequence, str]] = []
        for seq in batch:
            try:
                rows.append(self._runner.decode_one(seq.output_ids[-1], seq.num_cached, seq.slot))
                stepped.append(seq)
            except Exception as exc:
                log.exception("decode failed for request %d", seq.request_id)
                failed.append((seq, f"decode failed: {type(exc).__name__}: {exc}"))
        for seq in stepped:
            seq.num_cached += 1  # before ending the failed ones: a slot move copies num_cached positions
        for seq, error in failed:
            self._end(seq, FinishReason.ERROR, error, dirty=True)
        if stepped:
            self._sample(stepped, torch.cat(rows))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Pick each sequence's next token, stream it, and end the sequences that are done.

        A sequence whose logits are not finite, whose draw fails, or whose text cannot be decoded ends with
        an error; every other sequence of the batch gets its token."""
        try:
            bad = bad_rows(logits)
            if bool(bad.any()):
                logits = logits.masked_fill(bad.unsqueeze(-1), 0.0)
            bad_list = bad.tolist()
            draws = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        except Exception as exc:
            if len(seqs) > 1:  # the batch could not be sampled as a whole: each sequence alone
                log.warning("sampling failed for %d requests (%s: %s); sampling each alone", len(seqs),
                            type(exc).__name__, exc)
                for i, seq in enumerate(seqs):
                    self._sample([seq], logits[i : i + 1])
                return
            log.exception("sampling failed for request %d", seqs[0].request_id)
            self._end(seqs[0], FinishReason.ERROR, f"sampling failed: {type(exc).__name__}: {exc}")
            return
        for i, (seq, token, is_bad) in enumerate(zip(seqs, draws.tokens, bad_list, strict=True)):
            if is_bad:
                self._end(seq, FinishReason.ERROR, NONFINITE_LOGITS, dirty=True)
                continue
            if i in draws.errors:
                log.error("request %d: %s", seq.request_id, draws.errors[i])
                self._end(seq, FinishReason.ERROR, draws.errors[i])
                continue
            try:
                done = seq.append(int(token), draws.logprobs.get(i))
            except Exception as exc:
                log.exception("detokenizing failed for request %d", seq.request_id)
                self._end(seq, FinishReason.ERROR, f"detokenizing failed: {type(exc).__name__}: {exc}")
                continue
            self._generated_tokens += 1
            if done:
                self._end(seq, seq.finish_reason or FinishReason.STOP)

    def _end(self, seq: Sequence, reason: FinishReason, error: str | None = None,
             dirty: bool = False) -> None:
        """Finish a running sequence (engine thread) and give its slot to the last one."""
        seq.finish(reason, error)
        assert self._runner is not None
        self._runner.release(seq.slot, dirty)
        with self._cond:
            move = self._scheduler.release(seq)
            self._record_finish(seq)
            self._cond.notify_all()  # wait_idle
        if move is not None:  # even with nothing cached yet: the moved sequence's reserved room goes with it
            self._runner.move(move.src, move.dst, move.length)

    def _record_finish(self, seq: Sequence) -> None:
        """Counters and the latency average (caller holds the lock)."""
        self._by_id.pop(seq.request_id, None)
        self._finished[str(seq.finish_reason)] += 1
        latency = self._clock.monotonic() - seq.submitted_at
        prev = self._latency_ewma_s
        self._latency_ewma_s = latency if prev is None else prev + _LATENCY_EWMA_WEIGHT * (latency - prev)

    def _on_cancel(self, handle: RequestHandle) -> None:
        """handle.cancel(): a queued request ends now; a running one frees its slot at the next step."""
        with self._cond:
            seq = self._by_id.get(handle.request_id)
            if seq is None:
                return
            if self._scheduler.remove_waiting(seq):
                seq.finish(FinishReason.CANCELLED)
                self._record_finish(seq)
            self._cond.notify_all()

    def _cancel_all(self, reason: FinishReason = FinishReason.CANCELLED, error: str | None = None, *,
                    engine_failed: bool = False) -> None:
        """End every queued and running request (stop without drain, or a crashed loop)."""
        with self._cond:
            s = self._scheduler
            victims = list(s.waiting) + list(s.running) + ([s.prefilling] if s.prefilling is not None else [])
            s.waiting.clear()
            s.running.clear()
            s.prefilling = None
            for seq in victims:
                seq.finish(reason, error, engine_failed=engine_failed)
                self._record_finish(seq)
            self._stop_cancelled += len(victims)
            self._cond.notify_all()
