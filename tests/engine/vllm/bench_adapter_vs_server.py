"""Benchmark (not a test): raw vLLM OpenAI server vs the VllmEngine adapter, same model, same knobs, one run.

    /opt/vllm-venv/bin/python tests/engine/vllm/bench_adapter_vs_server.py --model /tmp/mid --clients 1,16

Closed-loop clients, greedy, ``--new-tokens`` tokens each (ignore_eos), for ``--seconds`` per client count.
The server is driven over HTTP streaming /v1/completions; the adapter in-process through RequestHandle.aiter
(the replica's HTTP layer is not wired to it yet, so this is the engine side only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


async def _closed_loop(one: Any, clients: int, seconds: float) -> dict[str, float]:
    ttfts: list[float] = []
    tokens = 0
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        nonlocal tokens
        while time.monotonic() < stop_at:
            n, ttft = await one()
            tokens += n
            ttfts.append(ttft)

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.monotonic() - started
    return {"clients": clients, "tok_s": tokens / wall, "requests": len(ttfts),
            "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else float("nan")}


def bench_server(args: argparse.Namespace) -> list[dict[str, float]]:
    import httpx

    port = 8311
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--dtype", args.dtype,
           "--max-model-len", str(args.max_context), "--max-num-seqs", str(args.max_num_seqs), "--port", str(port),
           "--host", "127.0.0.1", "--served-model-name", "m", "--kv-cache-memory-bytes", str(int(args.kv_gib * 2**30))]
    if args.eager:
        cmd.append("--enforce-eager")
    env = dict(os.environ)
    log = open(Path(args.log_dir) / "server.log", "w")  # noqa: SIM115
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        print(f"server ready in {time.monotonic() - started:.1f} s", flush=True)

        async def run() -> list[dict[str, float]]:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=128)) as http:
                async def one() -> tuple[int, float]:
                    t0 = time.monotonic()
                    ttft, n = None, 0
                    body = {"model": "m", "prompt": args.prompt, "max_tokens": args.new_tokens, "temperature": 0,
                            "stream": True, "ignore_eos": True}
                    async with http.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                if ttft is None:
                                    ttft = time.monotonic() - t0
                                n += 1 if json.loads(line[6:])["choices"][0]["text"] is not None else 0
                    return args.new_tokens, ttft or 0.0

                await _closed_loop(one, 1, 3)  # warm-up
                return [await _closed_loop(one, c, args.seconds) for c in args.clients]

        return asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(30)


def bench_adapter(args: argparse.Namespace) -> list[dict[str, float]]:
    from lockstep.engine import SamplingParams
    from lockstep.engine.vllm import VllmConfig, VllmEngine

    started = time.monotonic()
    engine = VllmEngine(VllmConfig(args.model, dtype=args.dtype, max_context=args.max_context, kv_cache_gib=args.kv_gib,
                                   max_batch_size=args.max_num_seqs, enforce_eager=args.eager)).start()
    print(f"adapter ready in {time.monotonic() - started:.1f} s", flush=True)
    try:
        ids = engine.tokenizer(args.prompt)["input_ids"]
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

        async def one() -> tuple[int, float]:
            final = await engine.submit(ids, params).aresult()
            return final.completion_tokens, final.ttft_s or 0.0

        async def run() -> list[dict[str, float]]:
            await _closed_loop(one, 1, 3)
            return [await _closed_loop(one, c, args.seconds) for c in args.clients]

        return asyncio.run(run())
    finally:
        engine.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-gib", type=float, default=2.0)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--prompt", default="The cat sat on the mat and")
    p.add_argument("--log-dir", default="/tmp")
    p.add_argument("--only", choices=["server", "adapter"])
    args = p.parse_args()
    print("load average at start:", os.getloadavg(), flush=True)
    rows: dict[str, list[dict[str, float]]] = {}
    if args.only in (None, "server"):
        rows["vllm server"] = bench_server(args)
    if args.only in (None, "adapter"):
        rows["VllmEngine adapter"] = bench_adapter(args)
    print("load average at end:", os.getloadavg())
    for name, results in rows.items():
        for r in results:
            print(f"| {name} | C={r['clients']} | {r['tok_s']:.1f} tok/s | TTFT p50 {r['ttft_p50_ms']:.0f} ms "
                  f"| {r['requests']} requests |")


if __name__ == "__main__":
    main()
