"""Engine throughput and latency vs plain ``model.generate`` one request at a time (in-process, no HTTP).

    python benchmarks/engine_bench.py --model PATH [--concurrency 1,4,16,64] [--max-new-tokens 64] [--temperature T]
    python benchmarks/engine_bench.py --model PATH --step-batches 16,32,64,128,192,256

The second form measures only the batched decode step (``LlamaRunner.decode``) at each batch size: its
median time and the tokens per second it gives (batch / step time), the figures behind the engine's cap on
an automatic batch size (``lockstep.engine.batch_size.MAX_AUTO_BATCH``).

Every request decodes for a fixed number of tokens (eos ignored on both sides), greedily or, with
``--temperature``, sampled (each request seeded, as rollouts are), so both paths do the same work:
lengths cycle through 1/2x..3/2x ``--max-new-tokens`` (mean 1x) so that requests
finish, and new ones arrive, at different steps, as with real traffic. Submitters are closed loops: each
sends its next request when the previous one ends. Prints a markdown table; speedup is tokens/s over
the baseline's; "TTFT p50 / lone" compares with the engine at concurrency 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

from lockstep.engine import Engine, SamplingParams  # noqa: E402
from lockstep.engine.llama_runner import LlamaRunner  # noqa: E402

TEXTS = [
    "Once upon a time there was a small fox who lived near the river and liked to count the stars.",
    "The engine streams tokens while the client reads them.",
    "Write a short story about a red bird and a blue boat.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "Question: what colour is the sky on a clear day? Answer:",
    "The quick brown fox jumps over the lazy dog again and again.",
    "Hello",
    "Explain, in simple words, why the moon changes its shape during the month, step by step.",
]


@dataclass
class Sample:
    latency_s: float
    ttft_s: float
    tokens: int


@dataclass
class Row:
    mode: str
    concurrency: int
    samples: list[Sample]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s


def length(n_new: int, i: int) -> int:
    """Tokens for request ``i``: cycles over 8 values from n/2 to 3n/2 (mean n), in a shuffled order."""
    return max(1, round(n_new * (0.5 + ((i * 5) % 8 + 0.5) / 8)))


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class FirstTokenTimer:
    """A generate() streamer that records when the first new token arrives (put #1 is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def baseline(model, prompts: list[list[int]], n_new: int, n_requests: int, first: int = 0,
             temperature: float = 0.0) -> Row:
    """Requests ``first..first+n_requests-1``, one at a time through model.generate (fixed length)."""
    samples = []
    start = time.perf_counter()
    for i in range(first, first + n_requests):
        ids = torch.tensor([prompts[i % len(prompts)]], device=model.device)
        n = length(n_new, i)
        timer = FirstTokenTimer()
        t0 = time.perf_counter()
        with torch.inference_mode():
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature else {
                "do_sample": False}
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, streamer=timer, **sampling)
        t1 = time.perf_counter()
        samples.append(Sample(t1 - t0, (timer.first or t1) - t0, out.shape[1] - ids.shape[1]))
    return Row("generate (1 at a time)", 1, samples, time.perf_counter() - start)


def engine_run(engine: Engine, prompts: list[list[int]], n_new: int, concurrency: int, per_submitter: int,
               spread_s: float, temperature: float = 0.0) -> Row:
    """``concurrency`` closed-loop submitter threads, ``per_submitter`` requests each; their first
    requests are spread evenly over ``spread_s`` seconds (not one synchronized burst)."""
    samples: list[Sample] = []
    lock = threading.Lock()

    def submitter(k: int) -> None:
        time.sleep(k * spread_s / concurrency)
        for j in range(per_submitter):
            i = k * per_submitter + j
            params = SamplingParams(max_new_tokens=length(n_new, i), ignore_eos=True, temperature=temperature,
                                    seed=i if temperature else None)
            final = engine.submit(prompts[i % len(prompts)], params).result(timeout=3600)
            with lock:
                ttft = final.ttft_s if final.ttft_s is not None else final.latency_s
                samples.append(Sample(final.latency_s, ttft, final.completion_tokens))

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Row("engine", concurrency, samples, time.perf_counter() - start)


def in_thread(fn, *args):
    """Run ``fn`` in a worker thread, as the engine runs its loop: on a loaded CPU, OpenMP work issued from
    the main thread was measured ~30x slower than from another thread, which would flatter the engine."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)))
    thread.start()
    thread.join()
    return result[0]


def step_times(model, batches: list[int], prompt_len: int = 10, steps: int = 8, passes: int = 2) -> list[str]:
    """Median decode-step time at each batch size (every sequence ``prompt_len`` tokens in), best of
    ``passes`` passes over all sizes, so that load drifting on a shared machine weighs on every size alike."""
    best: dict[int, float] = {}
    with torch.inference_mode():
        for _ in range(passes):
            for b in batches:
                runner = LlamaRunner(model, b, prompt_len + steps + 4)
                runner.prefill([[5] * prompt_len] * b, list(range(b)))
                pos = prompt_len
                for _ in range(2):  # warm-up steps
                    runner.decode([7] * b, [pos] * b)
                    pos += 1
                took = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    runner.decode([7] * b, [pos] * b)
                    took.append(time.perf_counter() - t0)
                    pos += 1
                runner.close()
                best[b] = min(best.get(b, float("inf")), statistics.median(took))
    rows = ["| batch | decode step (median) ms | tokens/s |", "|---:|---:|---:|"]
    rows += [f"| {b} | {best[b] * 1000:.1f} | {b / best[b]:.0f} |" for b in batches]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory (config, safetensors, tokenizer)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated submitter counts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled, seeded per request")
    parser.add_argument("--requests-per-submitter", type=int, default=3)
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "llama", "hf"])
    parser.add_argument("--step-batches", default="",
                        help="comma-separated batch sizes: measure only the decode step at each, then exit")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads for both paths (0: torch's default). On a CPU shared "
                        "with other busy processes, 1 avoids OpenMP barrier stalls that were measured to "
                        "slow generate() 10-20x")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    levels = [int(c) for c in args.concurrency.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 use_safetensors=True).to(args.device).eval()
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {n_params / 1e6:.1f} M parameters, {args.device} {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, {args.max_new_tokens} new tokens per request (mean)",
          flush=True)
    if args.step_batches:
        batches = [int(b) for b in args.step_batches.split(",")]
        print("\n".join(in_thread(step_times, model, batches)))
        return

    # Warm-up: the first calls pay one-time costs.
    in_thread(baseline, model, prompts, args.max_new_tokens, 2, 0, args.temperature)
    # Half the baseline runs before the engine and half after, so a change in machine load during the
    # run (shared CPUs) does not favour either side.
    half = max(1, args.baseline_requests // 2)
    before = in_thread(baseline, model, prompts, args.max_new_tokens, half, 0, args.temperature)
    print(f"baseline (first half) done: {before.tokens_per_s:.1f} tokens/s", flush=True)
    rows: list[Row] = []
    # The KV cache is preallocated: size its context to this workload, not the model's maximum.
    context = max(len(p) for p in prompts) + max(length(args.max_new_tokens, i) for i in range(8))
    engine = Engine(model, tokenizer, max_batch_size=max(levels), max_queue=max(256, max(levels)),
                    max_context=context, backend=args.backend).start()
    print(f"engine: backend {engine.backend}, KV cache {engine.kv_cache_bytes / 2**20:.0f} MiB", flush=True)
    try:
        engine.generate(prompts[0], SamplingParams(max_new_tokens=4))  # warm-up
        spread = 0.0  # one lone request's latency once measured: arrivals spread over a request's lifetime
        for c in levels:
            row = engine_run(engine, prompts, args.max_new_tokens, c, args.requests_per_submitter, spread,
                             args.temperature)
            rows.append(row)
            if c == 1:
                spread = statistics.median(s.latency_s for s in rows[-1].samples)
            print(f"concurrency {c} done: {rows[-1].tokens_per_s:.1f} tokens/s", flush=True)
    finally:
        engine.close()
    after = in_thread(baseline, model, prompts, args.max_new_tokens, half, half, args.temperature)
    print(f"baseline (second half) done: {after.tokens_per_s:.1f} tokens/s", flush=True)
    rows.insert(0, Row(before.mode, 1, before.samples + after.samples, before.wall_s + after.wall_s))

    base_tps = rows[0].tokens_per_s
    lone = [r for r in rows[1:] if r.concurrency == 1]
    lone_ttft = statistics.median(s.ttft_s for s in lone[0].samples) if lone else None
    print()
    print("| path | concurrency | requests | tokens/s | speedup | p50 latency s | p99 latency s "
          "| p50 TTFT s | p99 TTFT s | TTFT p50 / lone |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lat = [s.latency_s for s in r.samples]
        ttft = [s.ttft_s for s in r.samples]
        ratio = "" if not lone_ttft or r.mode != "engine" else f"{statistics.median(ttft) / lone_ttft:.2f}"
        print(f"| {r.mode} | {r.concurrency} | {len(r.samples)} | {r.tokens_per_s:.1f} | "
              f"{r.tokens_per_s / base_tps:.2f}x | {pct(lat, 50):.3f} | {pct(lat, 99):.3f} | "
              f"{pct(ttft, 50):.3f} | {pct(ttft, 99):.3f} | {ratio} |")


if __name__ == "__main__":
    main()
