"""What one rollout round costs the fleet: a fine-tune run's round (``--prompts`` prompts × ``--n`` sampled
answers each, with log-probabilities) and its held-out evaluation (``--eval-prompts`` greedy answers), through
``POST /generate`` on real replicas, timed and with the replicas' CPU seconds per round.

    python benchmarks/rollout_round_bench.py --replicas 1 2

The replicas share one core (``--cpu``, as ``async_rl_bench.py`` pins them); this process runs on another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from async_rl_bench import pin
from common import BENCH_MODELS, cpu_seconds, ensure_models, machine
from tests.support.cluster import local_cluster

from lockstep.trainer.runs.rollouts import GenRequest, RolloutClient
from lockstep.trainer.runs.tasks import Task, get_task


def one_round(client: RolloutClient, task: Task, shape: tuple[int, int, float, bool], tokens: int, i: int) -> float:
    """Seconds for one round of ``shape`` (prompts, answers each, temperature, log-probabilities); round ``i``
    asks its own prompts with its own seeds."""
    prompts, n, temperature, logprobs = shape
    asked = task.prompts(prompts, seed=i, held_out=False)
    started = time.monotonic()
    answers = client.generate([GenRequest(q, tokens, temperature, seed=i * 1000 + g, group=g, n=n,
                                          logprobs=logprobs) for g, q in enumerate(asked)])
    if not all(a.ok for a in answers):
        raise SystemExit(f"a round failed: {next(a.error for a in answers if not a.ok)}")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per round (the run's batch_size)")
    parser.add_argument("--n", type=int, default=4, help="answers per prompt (the run's group_size)")
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16, help="max new tokens")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cpu", type=int, default=1, help="the core every replica runs on")
    args = parser.parse_args()
    print(json.dumps(machine()))
    ensure_models(["tiny", "tiny-s1"])
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)) - {args.cpu} or {args.cpu})
    task = get_task("digits")
    shapes = {f"round {args.prompts} x {args.n}": (args.prompts, args.n, 1.0, True),
              f"evaluation {args.eval_prompts} x 1 greedy": (args.eval_prompts, 1, 0.0, False)}
    print("\n| replicas | work | median wall per round | replicas' CPU per round |\n| --- | --- | --- | --- |")
    for replicas in args.replicas:
        with tempfile.TemporaryDirectory(prefix="rounds-") as root, \
                local_cluster(Path(root), BENCH_MODELS, replicas=replicas, LOCKSTEP_DTYPE="float32",
                              LOCKSTEP_UPDATE_MODE="inplace") as cluster:
            pids = [r.process.pid for r in cluster.replicas]
            for pid in pids:
                pin(pid, args.cpu)
            urls = [r.url for r in cluster.replicas]
            client = RolloutClient(lambda urls=urls: urls)
            try:
                for label, shape in shapes.items():
                    for i in range(3):  # warm-up: prompts and seeds the timed rounds do not use
                        one_round(client, task, shape, args.tokens, args.rounds + i)
                    cpu = sum(cpu_seconds(p) for p in pids)
                    walls = [one_round(client, task, shape, args.tokens, i) for i in range(args.rounds)]
                    cpu = (sum(cpu_seconds(p) for p in pids) - cpu) / args.rounds
                    print(f"| {replicas} | {label} | {statistics.median(walls):.3f} s | {cpu:.3f} s |", flush=True)
            finally:
                client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
