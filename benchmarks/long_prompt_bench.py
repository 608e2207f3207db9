"""Benchmark: what one long prompt does to the streams already decoding, with chunked prefill and without.

In-process engine (no HTTP) on a built-in model. ``--streams`` greedy requests decode ``--tokens`` tokens
each; once every stream is past its first few tokens, one prompt of ``--prompt-tokens`` tokens arrives.
Measured per mode, over ``--repeats`` rounds: the longest gap between two tokens of a running stream while
the long prompt is prefilled (from its arrival to its first token), the streams' median gap over the whole
round, and the long prompt's time to first token. Modes: ``LOCKSTEP_PREFILL_CHUNK_TOKENS`` auto (256 on
CPU, 2048 on GPU) and ``-1`` (off: the whole prompt in one step).

    .venv/bin/python benchmarks/long_prompt_bench.py --size mid --prompt-tokens 1500
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every benchmark here (docs/benchmarks.md)

from common import ensure_models, machine  # type: ignore[import-not-found]  # noqa: E402

from lockstep.engine import Engine, SamplingParams, TokenEvent  # noqa: E402
from lockstep.models import loader  # noqa: E402
from lockstep.models.tiny import corpus_text  # noqa: E402

MODES = {"chunked (auto)": None, "whole prompt (-1)": 0}  # the engine's prefill_chunk_tokens


def stream(handle: Any, times: list[float]) -> None:
    """Record the arrival time of every token of one request."""
    for event in handle:
        if isinstance(event, TokenEvent):
            times.append(time.perf_counter())


def one_round(loaded: loader.LoadedModel, chunk: int | None, prompt: list[int],
              args: argparse.Namespace) -> dict[str, Any]:
    tok = loaded.tokenizer
    engine = Engine(loaded.model, tok, max_batch_size=16, max_context=loaded.max_context, prefill_chunk_tokens=chunk)
    engine.start()
    try:
        starts = [tok(f"Stream {i}: once upon a time")["input_ids"] for i in range(args.streams)]
        params = SamplingParams(max_new_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        times: list[list[float]] = [[] for _ in starts]
        threads = [threading.Thread(target=stream, args=(engine.submit(ids, params), t), daemon=True)
                   for ids, t in zip(starts, times, strict=True)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while min(len(t) for t in times) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        arrived = time.perf_counter()
        long = engine.submit(prompt, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
        first = next(time.perf_counter() for e in long if isinstance(e, TokenEvent))
        long.result(120)
        for t in threads:
            t.join(300)
        gaps_during = [b - a for ts in times for a, b in zip(ts, ts[1:], strict=False) if b > arrived and a < first]
        gaps_all = [b - a for ts in times for a, b in zip(ts, ts[1:], strict=False)]
        return {"max_gap_during": max(gaps_during, default=0.0), "median_gap": statistics.median(gaps_all),
                "ttft": first - arrived, "chunk": engine.prefill_chunk_tokens}
    finally:
        engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="mid", choices=["tiny", "mid"])
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=120, help="tokens each running stream decodes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    folder = ensure_models([f"{args.size}-s0"])[f"{args.size}-s0"]
    from lockstep.core.settings import Settings

    settings = Settings(device="auto", dtype="auto", hf_hub_offline=True)
    loaded = loader.load(loader.resolve(str(folder), settings), settings)
    ids = loaded.tokenizer(corpus_text())["input_ids"]
    while len(ids) < args.prompt_tokens:
        ids = ids + ids
    prompt = ids[: args.prompt_tokens]
    rows = []
    for name, chunk in MODES.items():
        rounds = [one_round(loaded, chunk, prompt, args) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in rounds) for k in ("max_gap_during", "median_gap", "ttft")}
        rows.append((name, rounds[0]["chunk"], med, rounds))
        print(f"{name}: {rounds}", file=sys.stderr, flush=True)
    print(f"\n{args.size}, {args.streams} streams decoding, one {args.prompt_tokens}-token prompt arrives "
          f"(median of {args.repeats} rounds)\n")
    print("| prefill | chunk tokens | longest stream gap while it prefills | stream gap p50 | its TTFT |")
    print("| --- | --- | --- | --- | --- |")
    for name, chunk, med, _ in rows:
        ms = {k: f"{v * 1000:.0f} ms" for k, v in med.items()}
        print(f"| {name} | {chunk or 'off'} | {ms['max_gap_during']} | {ms['median_gap']} | {ms['ttft']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
