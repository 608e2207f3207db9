"""Benchmark: serving throughput and latency of one replica over HTTP (issue 3.5), against plain transformers.

For each model size and each concurrency C in ``--concurrency``, C clients send streaming
``/v1/completions`` requests back to back (greedy, exactly ``--tokens`` new tokens: the built-in models
never write end-of-sequence, and every answer is checked to have that length). Measured on the client:
throughput (completion tokens / wall time of the level), latency p50/p99, time to first token p50/p99.

Baseline, measured in the same run on the same model and settings: plain transformers
``model.generate(do_sample=False, min_new_tokens=max_new_tokens=N)``, one request at a time in this
process (time to first token through a streamer), before and after the servers; the faster of the two
runs is the reference, so load drifting on a shared machine cannot flatter the ratios. With
``--transformers-serve`` the same HTTP load also runs against ``transformers serve --continuous-batching``
on the same model folder.

With ``--configs`` the replica runs once per named set of environment variables instead (e.g. old and new
defaults), each ``--rounds`` times, alternating their order from round to round (A B B A ...) so that load
drifting on a shared machine weighs on every configuration alike; the largest batch the replica ran
(``running`` in its /status, polled during each level) is reported beside each figure.

    .venv/bin/python benchmarks/serve_bench.py --sizes tiny mid --concurrency 1 4 16 64
    .venv/bin/python benchmarks/serve_bench.py --sizes mid --concurrency 1 16 64 --rounds 2 \
        --configs old:LOCKSTEP_DTYPE=float32,LOCKSTEP_MAX_BATCH_SIZE=16 new:
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from common import (  # type: ignore[import-not-found]
    PROMPTS,
    ensure_models,
    free_port,
    percentile,
    replica,
    replica_env,
    run_sizes,
    wait_for,
)


@dataclass
class Result:
    """One request: seconds from send to first token and to the end, and the tokens it got."""

    ttft: float
    latency: float
    tokens: int
    first_round: bool = False  # one of the first C requests, which all clients send at the same instant


@dataclass
class Level:
    """One concurrency level (or the baseline): per-request results and the wall time they took."""

    name: str
    concurrency: int
    results: list[Result]
    wall_s: float
    max_running: int | None = None  # the largest batch the replica's /status showed during the level
    load_avg_1m: float | None = None  # the machine's load average when the level ended

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.results) / self.wall_s

    def summary(self) -> dict[str, Any]:
        lat = [r.latency for r in self.results]
        ttft = [r.ttft for r in self.results]
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "requests": len(self.results),
            "tokens_per_s": self.tokens_per_s,
            "latency_p50_s": percentile(lat, 50),
            "latency_p99_s": percentile(lat, 99),
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99),
            "ttft_first_round_p50_s": percentile([r.ttft for r in self.results if r.first_round] or ttft, 50),
            "wall_s": self.wall_s,
            "max_running": self.max_running,
            "load_avg_1m": self.load_avg_1m,
        }


# ---------------------------------------------------------------------------------------------- baseline
def baseline(model_dir: Path, tokens: int, requests: int) -> Level:
    """Plain transformers generate, one request at a time, greedy, exactly ``tokens`` new tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.first: float | None = None

        def put(self, value: Any) -> None:
            self.calls += 1  # the first call carries the prompt, the second the first new token
            if self.calls == 2:
                self.first = time.monotonic()

        def end(self) -> None:
            pass

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def one(prompt: str) -> Result:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        streamer = FirstToken()
        started = time.monotonic()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                streamer=streamer,
                pad_token_id=tok.pad_token_id,
            )
        ended = time.monotonic()
        n = out.shape[1] - ids.shape[1]
        assert n == tokens, f"baseline produced {n} tokens, not {tokens}"
        return Result((streamer.first or ended) - started, ended - started, n)

    one(PROMPTS[0])  # warm-up
    started = time.monotonic()
    results = [one(PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
    return Level("transformers generate (sequential)", 1, results, time.monotonic() - started)


# ---------------------------------------------------------------------------------------------- HTTP load
async def _stream_one(http: httpx.AsyncClient, model: str, prompt: str, tokens: int) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.monotonic()
    first: float | None = None
    usage_tokens: int | None = None
    pieces = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    pieces += 1
                    if first is None:
                        first = time.monotonic()
    ended = time.monotonic()
    got = usage_tokens if usage_tokens is not None else pieces
    if got != tokens:
        raise RuntimeError(f"asked for {tokens} tokens, got {got}")
    return Result((first or ended) - started, ended - started, got)


async def _watch_batch(http: httpx.AsyncClient, seen: list[int], stop: asyncio.Event) -> None:
    """Poll the replica's /status every 0.25 s and keep the largest running batch it reports."""
    while not stop.is_set():
        try:
            seen.append(int((await http.get("/status")).json()["running"]))
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def _level(url: str, model: str, name: str, concurrency: int, requests: int, tokens: int,
                 watch_batch: bool = False) -> Level:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as http:
        await _stream_one(http, model, PROMPTS[0], tokens)  # warm the connection and the server
        queue = list(range(requests))
        results: list[Result] = []
        seen: list[int] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch_batch(http, seen, stop)) if watch_batch else None

        async def client(c: int) -> None:
            first_round = True
            while queue:
                i = queue.pop()
                result = await _stream_one(http, model, PROMPTS[(c + i) % len(PROMPTS)], tokens)
                result.first_round, first_round = first_round, False
                results.append(result)

        started = time.monotonic()
        await asyncio.gather(*(client(c) for c in range(concurrency)))
        wall = time.monotonic() - started
        stop.set()
        if watcher is not None:
            await watcher
        return Level(name, concurrency, results, wall, max(seen) if seen else None, os.getloadavg()[0])


def http_levels(url: str, model: str, name: str, args: argparse.Namespace, watch_batch: bool = False) -> list[Level]:
    levels = []
    for c in args.concurrency:
        requests = max(args.min_requests, c * args.requests_per_client)
        level = asyncio.run(_level(url, model, name, c, requests, args.tokens, watch_batch))
        batch = f", batch up to {level.max_running}" if level.max_running is not None else ""
        print(
            f"  {name} C={c}: {level.tokens_per_s:.1f} tok/s, "
            f"TTFT p50 {percentile([r.ttft for r in level.results], 50) * 1000:.0f} ms{batch}, "
            f"load {level.load_avg_1m:.1f}",
            flush=True,
        )
        levels.append(level)
    return levels


@contextmanager
def transformers_serve(model_dir: Path, log_dir: Path, threads: int | None) -> Iterator[str]:
    """``transformers serve --continuous-batching`` on a free port (offline, CPU)."""
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    log = open(log_dir / f"transformers-serve-{port}.log", "wb")
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--device",
            "cpu",
            "--continuous-batching",
        ],
        env=replica_env(threads),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: proc.poll() is not None or httpx.get(url + "/health", timeout=5).status_code == 200,
            600,
            0.5,
            "transformers serve",
        )
        if proc.poll() is not None:
            raise RuntimeError("transformers serve exited; see " + log.name)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def measure_baseline(model_dir: Path, args: argparse.Namespace, when: str) -> Level:
    level = baseline(model_dir, args.tokens, args.baseline_requests)
    gc.collect()  # the baseline's model goes before anything else runs
    ttft = percentile([r.ttft for r in level.results], 50)
    print(f"  baseline {when}: {level.tokens_per_s:.1f} tok/s, TTFT p50 {ttft * 1000:.0f} ms", flush=True)
    return level


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:K=V,K=V`` (``NAME:`` for the replica's defaults) → (NAME, {K: V})."""
    name, sep, pairs = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:K=V,K=V (NAME: alone for the defaults)")
    env = {}
    for pair in filter(None, pairs.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not key.startswith("LOCKSTEP_"):
            raise argparse.ArgumentTypeError(f"{pair!r} in {text!r} is not LOCKSTEP_NAME=VALUE")
        env[key] = value
    return name, env


def config_rounds(model_ref: str, args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Every ``--configs`` entry ``--rounds`` times, the order reversed every other round (A B B A ...)."""
    runs = []
    for round_no in range(args.rounds):
        order = args.configs if round_no % 2 == 0 else args.configs[::-1]
        for name, env in order:
            print(f"  round {round_no + 1}, {name}: {env or 'the defaults'}", flush=True)
            with replica(model_ref, log_dir, args.threads, **env) as proc:
                levels = http_levels(proc.url, "lockstep", f"lockstep {name}", args, watch_batch=True)
            runs.append({"config": name, "env": env, "round": round_no + 1,
                         "levels": [lv.summary() for lv in levels]})
    return runs


# ---------------------------------------------------------------------------------------------- report
def run_size(size: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    name = f"{size}-s0"
    model_dir = ensure_models([name])[name]
    first = measure_baseline(model_dir, args, "before the servers")
    if args.configs:
        runs = config_rounds(f"builtin:{name}", args, log_dir)
        second = measure_baseline(model_dir, args, "after the servers")
        base = max(first, second, key=lambda lv: lv.tokens_per_s)
        return {"size": size, "tokens": args.tokens, "baseline": base.summary(),
                "baseline_runs_tokens_per_s": [first.tokens_per_s, second.tokens_per_s], "configs": runs}
    env = {"LOCKSTEP_MAX_BATCH_SIZE": str(args.max_batch_size)} if args.max_batch_size else {}
    with replica(f"builtin:{name}", log_dir, args.threads, **env) as proc:
        ours = http_levels(proc.url, "lockstep", "lockstep", args)
    theirs: list[Level] = []
    if args.transformers_serve:
        try:
            with transformers_serve(model_dir, log_dir, args.threads) as url:
                theirs = http_levels(url, str(model_dir), "transformers serve --continuous-batching", args)
        except Exception as exc:  # report it and go on: it is a comparison, not the subject
            print(f"  transformers serve failed: {exc}", flush=True)
    # A shared machine's load drifts: measure the baseline again and keep the faster run (smaller ratios).
    second = measure_baseline(model_dir, args, "after the servers")
    base = max(first, second, key=lambda lv: lv.tokens_per_s)
    lone_ttft = (
        percentile([r.ttft for r in ours[0].results], 50) if ours and ours[0].concurrency == 1 else None
    )
    return {
        "size": size,
        "tokens": args.tokens,
        "baseline": base.summary(),
        "baseline_runs_tokens_per_s": [first.tokens_per_s, second.tokens_per_s],
        "lockstep": [lv.summary() for lv in ours],
        "transformers_serve": [lv.summary() for lv in theirs],
        "lone_ttft_p50_s": lone_ttft,
    }


def configs_markdown(results: list[dict[str, Any]]) -> str:
    """Per model, configuration and client count: tok/s of each round, their mean, and the ratio of that mean to
    the first configuration's."""
    rows = [
        "| model | config | clients | tok/s per round | tok/s mean | ÷ first config | TTFT p50 (mean) "
        "| latency p50 (mean) | largest batch seen | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        by_config: dict[str, dict[int, list[dict[str, Any]]]] = {}
        for run in r["configs"]:
            for lv in run["levels"]:
                by_config.setdefault(run["config"], {}).setdefault(lv["concurrency"], []).append(lv)
        first = next(iter(by_config.values()))
        for config, levels in by_config.items():
            for clients, runs in levels.items():
                mean = sum(lv["tokens_per_s"] for lv in runs) / len(runs)
                ref = sum(lv["tokens_per_s"] for lv in first[clients]) / len(first[clients])
                ttft = sum(lv["ttft_p50_s"] for lv in runs) / len(runs)
                latency = sum(lv["latency_p50_s"] for lv in runs) / len(runs)
                batch = max((lv["max_running"] or 0) for lv in runs)
                loads = " / ".join(f"{lv['load_avg_1m']:.1f}" for lv in runs)
                rounds = " / ".join(f"{lv['tokens_per_s']:.1f}" for lv in runs)
                rows.append(
                    f"| {r['size']} | {config} | {clients} | {rounds} | {mean:.1f} | {mean / ref:.2f} "
                    f"| {ttft * 1000:.0f} ms | {latency * 1000:.0f} ms | {batch} | {loads} |"
                )
        b = r["baseline"]
        rows.append(f"| {r['size']} | transformers `generate`, sequential (baseline) | 1 | "
                    + " / ".join(f"{t:.1f}" for t in r["baseline_runs_tokens_per_s"])
                    + f" | {b['tokens_per_s']:.1f} (best) | | {b['ttft_p50_s'] * 1000:.0f} ms "
                    f"| {b['latency_p50_s'] * 1000:.0f} ms | 1 | |")
    return "\n".join(rows)


def markdown(results: list[dict[str, Any]]) -> str:
    if results and "configs" in results[0]:
        return configs_markdown(results)
    rows = [
        "| model | server | clients | tok/s | × baseline | latency p50 / p99 | TTFT p50 / p99 "
        "| TTFT ÷ lone | first round TTFT p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r["baseline"]
        rows.append(
            f"| {r['size']} | transformers `generate`, sequential | 1 | {b['tokens_per_s']:.1f} | 1.00 "
            f"| {b['latency_p50_s'] * 1000:.0f} / {b['latency_p99_s'] * 1000:.0f} ms "
            f"| {b['ttft_p50_s'] * 1000:.0f} / {b['ttft_p99_s'] * 1000:.0f} ms | | |"
        )
        for server, levels in (
            ("lockstep", r["lockstep"]),
            ("transformers serve (CB)", r["transformers_serve"]),
        ):
            for lv in levels:
                lone = r["lone_ttft_p50_s"]
                ratio = f"{lv['ttft_p50_s'] / lone:.2f}" if lone and server == "lockstep" else ""
                rows.append(
                    f"| {r['size']} | {server} | {lv['concurrency']} | {lv['tokens_per_s']:.1f} "
                    f"| {lv['tokens_per_s'] / b['tokens_per_s']:.2f} "
                    f"| {lv['latency_p50_s'] * 1000:.0f} / {lv['latency_p99_s'] * 1000:.0f} ms "
                    f"| {lv['ttft_p50_s'] * 1000:.0f} / {lv['ttft_p99_s'] * 1000:.0f} ms | {ratio} "
                    f"| {lv['ttft_first_round_p50_s'] * 1000:.0f} ms |"
                )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request (fixed)")
    parser.add_argument("--requests-per-client", type=int, default=6,
                        help="the first round starts all at once; later ones show the steady state")
    parser.add_argument("--min-requests", type=int, default=8, help="requests per level at least")
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the baseline and OMP_NUM_THREADS of the servers (default: torch's)",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=None,
        help="LOCKSTEP_MAX_BATCH_SIZE of the replica (default: the replica's, 0 = sized from memory)"
    )
    parser.add_argument(
        "--configs", nargs="+", type=parse_config, default=[],
        help="compare replicas run with these environments, each NAME:LOCKSTEP_X=V,LOCKSTEP_Y=W (NAME: for the "
        "defaults); ratios are against the first. Replaces the single replica and --transformers-serve"
    )
    parser.add_argument("--rounds", type=int, default=1, help="with --configs: runs of every configuration")
    parser.add_argument("--transformers-serve", action="store_true", help="also load `transformers serve`")
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of every process measured ('' = the library's default, ACTIVE-ish); "
        "PASSIVE keeps idle OpenMP threads from spinning, which on a shared machine costs 10-25x",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch loads OpenMP; children inherit it
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the baseline loads from the cached folder only

    run_sizes(args, run_size, markdown, "serve-bench-")

if __name__ == "__main__":
    main()
