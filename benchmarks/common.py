"""What the replica benchmarks share: the machine they ran on, cached models, a replica process, greedy
references (to catch mislabelled answers), /metrics readings and percentiles."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.cluster import Proc, free_port, spawn, wait_for  # noqa: E402

BENCH_MODELS = REPO / "var" / "bench-models"  # LOCKSTEP_BUILTIN_DIR of the benchmarks: <size>-s<seed> folders
PROMPTS = ("Once upon a time", "The cat sat on", "One, two, three,", "Colours of the sky")


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, load average and date: printed with every result."""
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    ram_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram_kib = int(line.split()[1])
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_kib / 2**20, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
    }


def ensure_models(names: Sequence[str]) -> dict[str, Path]:
    """Build (once, then cached in var/bench-models) the built-in models named ``tiny-s0``, ``mid-s1``, ..."""
    from lockstep.models.tiny import ensure_builtin

    out = {}
    for name in names:
        started = time.monotonic()
        out[name] = ensure_builtin(name, BENCH_MODELS)
        took = time.monotonic() - started
        if took > 1:
            print(f"built {name} in {took:.0f}s", file=sys.stderr)
    return out


def replica_env(threads: int | None, **extra: str) -> dict[str, str]:
    """The environment of a benchmarked replica: cached models, offline, no shared folder."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LOCKSTEP_", "INFERENCE_URLS", "SYNC_STATE"))
    }
    env.update(
        {
            "LOCKSTEP_BUILTIN_DIR": str(BENCH_MODELS),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


@contextmanager
def replica(model: str, log_dir: Path, threads: int | None = None, **env: str) -> Iterator[Proc]:
    """``python -m lockstep serve --model MODEL`` on a free port; ready on yield, stopped on exit."""
    port = free_port()
    proc = spawn(
        f"replica-{port}",
        ["--log-level", "warning", "serve", "--port", str(port), "--model", model],
        replica_env(threads, **env),
        log_dir,
        port,
    )
    try:
        wait_for(lambda: proc.ready() or not proc.alive(), 600, 0.2, f"replica serving {model}")
        if not proc.alive():
            raise RuntimeError(f"the replica exited:\n{proc.log()[-3000:]}")
        yield proc
    finally:
        if proc.alive():
            proc.process.terminate()
            try:
                proc.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@lru_cache(maxsize=4)
def _load(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def reference_texts(model_dir: Path, prompts: Sequence[str], n: int) -> dict[str, str]:
    """Greedy answers of ``model_dir`` (whole-sequence forward per token, no cache, no batching)."""
    import torch

    model, tok = _load(model_dir)
    out = {}
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(tok(prompt)["input_ids"])
            start = len(ids)
            for _ in range(n):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            out[prompt] = str(tok.decode(ids[start:]))
    _load.cache_clear()  # the benchmark, not this reference, should own the memory from here on
    return out


def metric_totals(url: str) -> dict[str, float]:
    """Every sample of /metrics summed over its labels (e.g. ``lockstep_model_load_duration_seconds_sum``)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            key = f"{s.name}{{le={s.labels['le']}}}" if s.name.endswith("_bucket") else s.name
            totals[key] = totals.get(key, 0.0) + s.value
    return totals


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] (NaN when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def fmt_ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:.0f} ms"


def run_sizes(args: Any, run_size: Any, markdown: Any, prefix: str) -> None:
    """Run ``run_size`` for every ``args.sizes``, print the markdown table, write ``args.json`` if asked."""
    import json
    import tempfile

    info = machine()
    print(f"machine: {info}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for size in args.sizes:
            results.append(run_size(size, args, Path(tmp)))
    info["load_avg_after"] = machine()["load_avg"]
    print()
    print(markdown(results))
    if args.json:
        body = {"machine": info, "args": vars(args) | {"json": str(args.json)}, "results": results}
        args.json.write_text(json.dumps(body, indent=2, default=str))
