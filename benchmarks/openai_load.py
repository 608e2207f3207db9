"""Closed-loop load on an OpenAI-compatible server (a Lockstep replica, or vLLM's own), and what it saw.

Each client streams ``POST /v1/completions`` (greedy, exactly ``--tokens`` new tokens: ``ignore_eos`` for vLLM;
the built-in models never write end-of-sequence) and sends its next request when the last one ended. The
clients run in several processes (``--procs``), so that the client's Python is not what limits a fast GPU
server. Every answer keeps its timings, its text and the version it claims (the ``X-Model-Version`` header and
the ``model`` of the body, ``lockstep@vN``; none from vLLM's server).

    # throughput and time to first token at each concurrency, SECONDS per level after a warm-up
    python benchmarks/openai_load.py levels --url http://127.0.0.1:8000 --model lockstep \
        --concurrency 1 16 64 --seconds 15 --tokens 128 --json lockstep.json
    # load while a command runs (a publish), until the replica serves --expect-version and SETTLE seconds
    # more: failed answers, answers whose version tag is not the version whose weights wrote them, and the
    # longest gap between answers against the steady state's (--steady seconds of load before the command)
    python benchmarks/openai_load.py swap --url http://127.0.0.1:8000 --model lockstep --concurrency 16 \
        --steady 30 --expect-version 1 --json swap.json -- lockstep publish builtin:mid-s1 --shared DIR
    # one table of those files
    python benchmarks/openai_load.py report --raw raw.json --lockstep lockstep.json --swap swap.json

Mislabelled, in ``swap``: the header and the body disagree, or name a version that was never served, or the
text is closer to the other version's greedy answer for its prompt than to its own version's (each version's
reference answer is asked alone, before the swap and after it; closeness is the length of the common prefix,
so batch-dependent rounding late in an answer does not count). Only httpx is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

PROMPTS = ("Once upon a time", "The cat sat on", "One, two, three,", "Colours of the sky")
REQUEST_TIMEOUT_S = 300.0


@dataclass
class Answer:
    """One request as the client saw it (monotonic seconds, comparable across this machine's processes)."""

    start: float
    end: float
    prompt: str
    ok: bool
    ttft: float | None = None
    tokens: int = 0
    text: str = ""
    header_version: int | None = None
    body_version: int | None = None
    error: str = ""


def _version(value: str | None) -> int | None:
    if value is None:
        return None
    match = re.search(r"(?:^|@v)(\d+)$", value)
    return int(match.group(1)) if match else None


async def ask(http: httpx.AsyncClient, model: str, prompt: str, tokens: int) -> Answer:
    """One streamed, greedy completion of exactly ``tokens`` tokens; never raises."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.monotonic()
    answer = Answer(start, start, prompt, False)
    pieces: list[str] = []
    usage: int | None = None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            answer.header_version = _version(r.headers.get("x-model-version"))
            if r.status_code != 200:
                answer.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                answer.end = time.monotonic()
                return answer
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    answer.error = f"error in the stream: {str(chunk['error'])[:200]}"
                if answer.body_version is None and "@v" in str(chunk.get("model")):
                    answer.body_version = _version(chunk["model"])
                if chunk.get("usage"):
                    usage = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        if answer.ttft is None:
                            answer.ttft = time.monotonic() - start
                        pieces.append(choice["text"])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as exc:
        answer.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    answer.end = time.monotonic()
    answer.text = "".join(pieces)
    answer.tokens = usage if usage is not None else len(pieces)
    answer.ok = not answer.error and answer.tokens > 0
    return answer


async def _clients(url: str, model: str, first: int, count: int, tokens: int, deadline: float,
                   stop: Any) -> list[Answer]:
    limits = httpx.Limits(max_connections=count + 2, max_keepalive_connections=count + 2)
    answers: list[Answer] = []
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:

        async def client(c: int) -> None:
            n = 0
            while time.monotonic() < deadline and not stop.is_set():
                answers.append(await ask(http, model, PROMPTS[(c + n) % len(PROMPTS)], tokens))
                n += 1

        await asyncio.gather(*(client(first + c) for c in range(count)))
    return answers


def _worker(url: str, model: str, first: int, count: int, tokens: int, go: Any, stop: Any, deadline: Any,
            results: Any) -> None:
    try:
        results.put(("ready", None))
        if not go.wait(120):
            return
        answers = asyncio.run(_clients(url, model, first, count, tokens, deadline.value, stop))
        results.put(("done", [asdict(a) for a in answers]))
    except BaseException as exc:  # the parent must hear of it, or it waits for nothing
        results.put(("failed", f"client process failed: {exc!r}"))


class Load:
    """``concurrency`` closed-loop clients in ``procs`` processes for ``seconds`` (or until ``stop()``), from
    ``started``: the moment every client process was up."""

    def __init__(self, url: str, model: str, concurrency: int, tokens: int, seconds: float,
                 procs: int | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        self.stop_event, go, self.results = ctx.Event(), ctx.Event(), ctx.Queue()
        deadline = ctx.Value("d", 0.0)
        procs = max(1, min(concurrency, procs or max(1, (os.cpu_count() or 2) // 4), 8))
        shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
        self.processes = [
            ctx.Process(target=_worker, daemon=True, args=(url, model, sum(shares[:i]), share, tokens, go,
                                                           self.stop_event, deadline, self.results))
            for i, share in enumerate(shares)
        ]
        for p in self.processes:
            p.start()
        for _ in self.processes:
            kind, detail = self.results.get(timeout=120)
            if kind != "ready":
                raise RuntimeError(str(detail))
        self.started = time.monotonic()
        self.deadline = deadline.value = self.started + seconds
        go.set()

    def stop(self) -> None:
        self.stop_event.set()

    def collect(self) -> list[Answer]:
        """Every answer, once each client's last request ended (bounded by the request timeout)."""
        answers: list[Answer] = []
        errors: list[str] = []
        wait_until = min(self.deadline, time.monotonic()) + REQUEST_TIMEOUT_S + 30
        for _ in self.processes:
            kind, got = self.results.get(timeout=max(1.0, wait_until - time.monotonic()))
            if kind == "done":
                answers.extend(Answer(**a) for a in got)
            else:
                errors.append(str(got))
        for p in self.processes:
            p.join(timeout=30)
        if errors:
            raise RuntimeError("; ".join(errors))
        return sorted(answers, key=lambda a: a.start)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` in [0, 100] (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def wait_serving(url: str, timeout: float) -> None:
    """Until the server answers one completion request (after a start, before measuring)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/v1/models", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer /v1/models within {timeout:.0f}s")
        time.sleep(1)


# ---------------------------------------------------------------------------------------------- levels
def tokens_within(answer: Answer, lo: float, hi: float) -> float:
    """The answer's tokens that arrived inside [lo, hi]: the first at its time to first token, the others
    spread evenly up to its end. Counting whole answers by their end instead would move in steps of a whole
    burst: closed-loop clients on a slow server finish together, a request's latency apart."""
    if answer.ttft is None or answer.tokens <= 0:
        return 0.0
    first = answer.start + answer.ttft
    count = 1.0 if lo <= first <= hi else 0.0
    rest = answer.tokens - 1
    if rest > 0:
        span = answer.end - first
        if span <= 0:
            count += rest if lo <= answer.end <= hi else 0
        else:
            count += rest * max(0.0, min(hi, answer.end) - max(lo, first)) / span
    return count


def level(url: str, model: str, concurrency: int, seconds: float, warmup: float, tokens: int,
          procs: int | None) -> dict[str, Any]:
    """Throughput (tokens streamed inside the window / the window) and latencies at one concurrency."""
    asyncio.run(_warm(url, model, tokens))
    load = Load(url, model, concurrency, tokens, warmup + seconds, procs)
    window = (load.started + warmup, load.started + warmup + seconds)
    answers = load.collect()
    began = [a for a in answers if a.ok and a.start >= window[0]]
    failed = [a for a in answers if not a.ok]
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": len(answers),
        "failed": len(failed),
        "failed_examples": [a.error for a in failed[:3]],
        "short": sum(1 for a in answers if a.ok and a.tokens != tokens),
        "tokens_per_s": sum(tokens_within(a, *window) for a in answers if a.ok) / seconds,
        "ttft_p50_s": percentile([a.ttft for a in began if a.ttft is not None], 50),
        "ttft_p99_s": percentile([a.ttft for a in began if a.ttft is not None], 99),
        "latency_p50_s": percentile([a.end - a.start for a in began], 50),
    }


async def _warm(url: str, model: str, tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        for prompt in PROMPTS:
            answer = await ask(http, model, prompt, tokens)
            if not answer.ok:
                raise RuntimeError(f"warm-up request failed: {answer.error}")


def cmd_levels(args: argparse.Namespace) -> int:
    wait_serving(args.url, args.ready_timeout)
    results = []
    for c in args.concurrency:
        result = level(args.url, args.model, c, args.seconds, args.warmup, args.tokens, args.procs)
        print(f"  {args.label} C={c}: {result['tokens_per_s']:.1f} tok/s, TTFT p50 {_ms(result['ttft_p50_s'])}, "
              f"{result['requests']} requests, {result['failed']} failed", flush=True)
        results.append(result)
    _write(args.json, {"label": args.label, "url": args.url, "tokens": args.tokens, "levels": results})
    return 0


# ---------------------------------------------------------------------------------------------- swap
def references(url: str, model: str, tokens: int) -> dict[str, Any]:
    """Each prompt's greedy answer asked alone, and the version that answered."""

    async def go() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
            out: dict[str, Any] = {"texts": {}, "versions": set()}
            for prompt in PROMPTS:
                a = await ask(http, model, prompt, tokens)
                if not a.ok:
                    raise RuntimeError(f"reference request failed: {a.error}")
                out["texts"][prompt] = a.text
                out["versions"].add(a.header_version)
            return out

    return asyncio.run(go())


def _one_version(refs: dict[str, Any], when: str) -> int:
    versions = refs["versions"]
    if len(versions) != 1 or None in versions:
        raise RuntimeError(f"the reference answers {when} name versions {sorted(map(str, versions))}: one expected "
                           "(is this a Lockstep replica, serving one version?)")
    return int(next(iter(versions)))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def mislabelled(answer: Answer, refs: dict[int, dict[str, str]]) -> str | None:
    """Why the version an answer claims is not the one that wrote it, or None."""
    if answer.header_version != answer.body_version:
        return f"header v{answer.header_version} != body v{answer.body_version}"
    if answer.header_version not in refs:
        return f"v{answer.header_version} was never served here"
    own = _common_prefix(answer.text, refs[answer.header_version][answer.prompt])
    other = max((_common_prefix(answer.text, texts[answer.prompt])
                 for v, texts in refs.items() if v != answer.header_version), default=-1)
    if other > own:
        return f"text matches another version's for {other} characters, its own for {own}"
    return None


def serving_version(url: str) -> int | None:
    try:
        value = httpx.get(url + "/status", timeout=10).json().get("serving_version")
        return int(value) if value is not None else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def longest_gap(ends: list[float], start: float, stop: float) -> float:
    """Longest time without a successful answer inside [start, stop]."""
    points = [start] + sorted(e for e in ends if start <= e <= stop) + [stop]
    return max(b - a for a, b in zip(points, points[1:], strict=False))


def cmd_swap(args: argparse.Namespace) -> int:
    if not args.command:
        raise SystemExit("swap: give the command that publishes after --")
    versioned = args.expect_version is not None  # raw vLLM tags nothing: no labels to check, only the pause
    wait_serving(args.url, args.ready_timeout)
    before = references(args.url, args.model, args.tokens)
    old = _one_version(before, "before the command") if versioned else None
    load = Load(args.url, args.model, args.concurrency, args.tokens, args.timeout + 120, args.procs)
    t_load = time.monotonic()
    time.sleep(args.warmup + args.steady)
    t_command = time.monotonic()
    try:
        done = subprocess.run(args.command, capture_output=True, text=True, timeout=args.timeout)
        rc, output = done.returncode, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        rc, output = 124, f"timed out after {args.timeout}s: {exc}"
    t_command_end = time.monotonic()
    t_served = None if versioned else t_command_end
    deadline = time.monotonic() + 60
    while versioned and rc == 0 and time.monotonic() < deadline:
        if serving_version(args.url) == args.expect_version:
            t_served = time.monotonic()
            break
        time.sleep(0.05)
    time.sleep(args.settle)
    load.stop()
    answers = load.collect()
    t_end = time.monotonic()
    after = references(args.url, args.model, args.tokens)
    new = _one_version(after, "after the command") if versioned else None
    ok = [a for a in answers if a.ok]
    failed = [a for a in answers if not a.ok]
    cycle = percentile([a.end - a.start for a in ok if a.end < t_command], 50)
    if cycle is not None and args.steady < 3 * cycle:
        print(f"  warning: the steady window ({args.steady:.0f} s) is shorter than 3 answer latencies "
              f"({cycle:.1f} s each): the steady gap may be understated; raise --steady", flush=True)
    wrong = []
    if versioned:
        assert old is not None and new is not None
        refs = {old: before["texts"], new: after["texts"]}
        wrong = [(a, why) for a in ok if (why := mislabelled(a, refs))]
    # Answers that began well after the flip was seen (a poll, plus slack) must come from the new version.
    late_old = [a for a in ok if t_served is not None and a.start > t_served + 0.5 and a.header_version == old]
    by_version: dict[str, int] = {}
    for a in ok:
        by_version[f"v{a.header_version}"] = by_version.get(f"v{a.header_version}", 0) + 1
    result = {
        "label": args.label,
        "clients": args.concurrency,
        "tokens": args.tokens,
        "command": args.command,
        "command_rc": rc,
        "command_output_tail": output,
        "old_version": old,
        "new_version": new,
        "expected_version": args.expect_version,
        "versions_distinguishable": before["texts"] != after["texts"],
        "command_s": t_command_end - t_command,
        "command_to_served_s": (t_served - t_command) if t_served is not None else None,
        "requests": len(answers),
        "answers_by_version": by_version,
        "failed": len(failed),
        "failed_examples": [asdict(a) for a in failed[:3]],
        "mislabelled": len(wrong) if versioned else None,
        "mislabelled_examples": [asdict(a) | {"why": why} for a, why in wrong[:3]],
        "old_version_after_flip": len(late_old),
        "short": sum(1 for a in ok if a.tokens != args.tokens),
        "longest_gap_s": longest_gap([a.end for a in ok], t_command, t_end),
        # Steady state: the longest gap while nothing changed (the --steady seconds before the command); at
        # the flip: the longest gap within a second of the moment the new version was seen served. Closed-loop
        # clients on a slow server answer in bursts a request's latency apart, so a window shorter than a few
        # latencies misses the gaps between bursts and understates the steady gap (cycle_s and the warning).
        "steady_gap_s": longest_gap([a.end for a in ok], t_load + args.warmup, t_command),
        "steady_window_s": t_command - (t_load + args.warmup),
        "cycle_s": cycle,
        "flip_gap_s": (longest_gap([a.end for a in ok], t_served - 1.0, min(t_end, t_served + 1.0))
                       if t_served is not None else None),
        # Every answer's end, seconds from the command's start (negative: before it), for a timeline.
        "answer_ends_s": sorted(round(a.end - t_command, 3) for a in ok),
        "served_at_s": (t_served - t_command) if t_served is not None else None,
        "latency_before_p50_s": percentile([a.end - a.start for a in ok if a.end < t_command], 50),
        "latency_during_p50_s": percentile(
            [a.end - a.start for a in ok if a.start < (t_served or t_command_end) and a.end > t_command], 50),
    }
    _write(args.json, result)
    print(f"  swap v{old} -> v{new} (command rc {rc}, {result['command_s']:.1f}s): {len(answers)} answers, "
          f"{len(failed)} failed, {len(wrong)} mislabelled, {len(late_old)} old after the flip", flush=True)
    clean = rc == 0 and t_served is not None and new == args.expect_version and not failed and not wrong
    if not versioned:
        return 0 if rc == 0 and not failed else 1
    return 0 if clean and not late_old else 1


# ---------------------------------------------------------------------------------------------- report
def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def _ratio(run: dict[str, Any]) -> str:
    steady = run.get("steady_gap_s")
    return f" ({run['longest_gap_s'] / steady:.2f}×)" if steady else ""


def _load(path: Path | None) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path and path.is_file() else None


def report_table(raw: dict[str, Any] | None, ours: dict[str, Any] | None, swap: dict[str, Any] | None,
                 raw_reload: dict[str, Any] | None = None) -> str:
    raw_levels = {lv["concurrency"]: lv for lv in (raw or {}).get("levels", [])}
    our_levels = {lv["concurrency"]: lv for lv in (ours or {}).get("levels", [])}

    def cell(lv: dict[str, Any] | None, key: str) -> str:
        if lv is None:
            return "n/a"
        value = lv[key]
        if key.endswith("_p50_s"):
            return _ms(value)
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    rows = [] if raw else ["raw vLLM: not measured"]
    rows += ["| clients | raw vLLM tok/s | lockstep tok/s | lockstep / raw | TTFT p50 raw / lockstep "
            "| failed raw / lockstep |", "|---|---|---|---|---|---|"]
    for c in sorted(set(raw_levels) | set(our_levels)):
        r, o = raw_levels.get(c), our_levels.get(c)
        ratio = f"{o['tokens_per_s'] / r['tokens_per_s']:.2f}" if r and o and r["tokens_per_s"] else "n/a"
        rows.append(f"| {c} | {cell(r, 'tokens_per_s')} | {cell(o, 'tokens_per_s')} | {ratio} "
                    f"| {cell(r, 'ttft_p50_s')} / {cell(o, 'ttft_p50_s')} "
                    f"| {cell(r, 'failed')} / {cell(o, 'failed')} |")
    changes = [(f"lockstep v{swap['old_version']} → v{swap['new_version']}", swap)] if swap else []
    if raw_reload:
        changes.append(("raw vLLM reload (pause, reload_weights, resume)", raw_reload))
    if changes:
        rows += ["", "| change under load | rc | clients | answers | failed | mislabelled | old version after the "
                 "flip | command → served | longest gap steady / at the flip / whole change (÷ steady) | latency p50 "
                 "before / during |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in changes:
        served = run["command_to_served_s"]
        rows.append(
            f"| {name} | {run['command_rc']} | {run['clients']} | {run['requests']} | {run['failed']} "
            f"| {'no tags' if run['mislabelled'] is None else run['mislabelled']} | {run['old_version_after_flip']} "
            f"| {'not served' if served is None else f'{served:.1f} s'} | {_ms(run.get('steady_gap_s'))} / "
            f"{_ms(run.get('flip_gap_s'))} / {_ms(run['longest_gap_s'])}{_ratio(run)} "
            f"| {_ms(run['latency_before_p50_s'])} / {_ms(run['latency_during_p50_s'])} |")
    if swap and not swap["versions_distinguishable"]:
        rows.append("(both versions answer the same: the text check could not tell them apart)")
    return "\n".join(rows)


def cmd_report(args: argparse.Namespace) -> int:
    raw, ours, swap, meta = _load(args.raw), _load(args.lockstep), _load(args.swap), _load(args.meta)
    print(report_table(raw, ours, swap, _load(args.raw_reload)))
    replica = (meta or {}).get("replica") or {}
    if replica:
        print(f"\nthe replica ran on: {replica.get('engine')} (vllm:* series on its /metrics: "
              f"{replica.get('vllm_series')}); answers the engine saw sampled by another version's weights: "
              f"{replica.get('engine_version_mismatches')}")
    for key in ("gpu", "vllm", "torch"):
        if meta and meta.get(key):
            print(f"{key}: {meta[key]}")
    _write(args.json, {"meta": meta, "raw_vllm": raw, "lockstep": ours, "swap": swap,
                       "raw_vllm_reload": _load(args.raw_reload)})
    return 0


def _write(path: Path | None, body: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(body, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("levels", "swap"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--model", required=True, help="the model name the server answers to")
        p.add_argument("--tokens", type=int, default=64, help="new tokens per request (exactly)")
        p.add_argument("--procs", type=int, default=None, help="client processes (default: cores / 4, at most 8)")
        p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
        p.add_argument("--ready-timeout", type=float, default=60.0)
        p.add_argument("--label", default=name)
        p.add_argument("--json", type=Path, default=None)
    levels = sub.choices["levels"]
    levels.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    levels.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level")
    swap = sub.choices["swap"]
    swap.add_argument("--concurrency", type=int, default=16)
    swap.add_argument("--expect-version", type=int, default=None,
                      help="the version the command makes served (omit for a server without version tags: raw vLLM)")
    swap.add_argument("--steady", type=float, default=10.0,
                      help="seconds of load after the warm-up, before the command: the steady state")
    swap.add_argument("--settle", type=float, default=5.0, help="seconds of load after the flip")
    swap.add_argument("--timeout", type=float, default=600.0, help="seconds the command may take")
    swap.add_argument("command", nargs=argparse.REMAINDER, help="-- the command that publishes")
    report = sub.add_parser("report")
    for name in ("raw", "lockstep", "swap", "raw-reload", "meta", "json"):
        report.add_argument(f"--{name}", type=Path, default=None)
    args = parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    return {"levels": cmd_levels, "swap": cmd_swap, "report": cmd_report}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
