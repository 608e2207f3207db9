"""Synchronous against asynchronous fine-tuning on the same fleet: wall time until the held-out reward first
reaches a threshold, the versions it took, and the staleness bound checked from each run's own record.

    python benchmarks/async_rl_bench.py --seeds 0 1 2 --steps 30 --max-staleness 1

Two real replicas and a real trainer (``tests.support.cluster``), the built-in tiny model and the ``digits``
task. With ``--pin`` (default) the trainer runs on CPU 0 and both replicas on CPU 1, as a trainer and a fleet on
separate machines would: without it, on a 2-core machine every process competes for both cores and overlapping
generation with training gains nothing. Runs alternate between the modes, seed by seed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import BENCH_MODELS, ensure_models, machine
from tests.support.cluster import LocalCluster, Proc, free_port, local_cluster, spawn, wait_for

RUN_TIMEOUT_S = 1800.0


def pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` (and those it starts later) on ``cpu``."""
    subprocess.run(["taskset", "-a", "-cp", str(cpu), str(pid)], check=True, capture_output=True)


def start_trainer(cluster: LocalCluster) -> Proc:
    port = free_port()
    urls = ",".join(r.url for r in cluster.replicas)
    proc = spawn("trainer", ["trainer", "--port", str(port)],
                 cluster.env(INFERENCE_URLS=urls, LOCKSTEP_DISCOVERY="static"), cluster.root / "logs", port)
    cluster.others.append(proc)
    wait_for(lambda: proc.get("/ready").status_code == 200, 120, 0.2, "the trainer to be ready")
    return proc


def run_once(trainer: Proc, params: dict[str, Any], threshold: float) -> dict[str, Any]:
    created = trainer.post("/runs", json={"kind": "finetune", "params": params})
    if created.status_code != 201:
        raise SystemExit(f"the trainer refused the run: {created.text}")
    run_id = created.json()["id"]
    run: dict[str, Any] = wait_for(lambda: (r := trainer.get(f"/runs/{run_id}").json())["active"] is False and r,
                                   RUN_TIMEOUT_S, 1.0, f"run {run_id} to end")
    if run["status"] != "succeeded":
        raise SystemExit(f"run {run_id} {run['status']}: {run['error']}")
    lineage = [run["start_version"], *run["versions"]]
    reached = next((e for e in run["evals"] if e["version"] != run["start_version"] and e["reward"] is not None
                    and e["reward"] >= threshold), None)
    beyond = 0
    for point in run["metrics"]:
        newest = lineage.index(point["version"])
        beyond += sum(n for producer, n in point["sample_versions"].items()
                      if newest - lineage.index(int(producer)) + point["publishing"] > params["max_staleness"])
    return {
        "run_id": run_id, "mode": "async" if params["async"] else "sync", "seed": params["seed"],
        "reached_s": round(reached["time"] - run["started_at"], 2) if reached else None,
        "reached_version": lineage.index(reached["version"]) if reached else None,  # trained versions it took
        "total_s": round(run["finished_at"] - run["started_at"], 2),
        "versions": len(run["versions"]), "final_reward": run["evals"][-1]["reward"] if run["evals"] else None,
        "used": sum(s["used"] for s in run["version_samples"].values()),
        "dropped_stale": sum(s["dropped_stale"] for s in run["version_samples"].values()),
        "beyond_bound": beyond,
        "failed": sum(m["errors"] for m in run["metrics"]) + sum(e["errors"] for e in run["evals"]),
        "mislabeled": sum(m["mislabeled"] for m in run["metrics"]) + sum(e.get("mislabeled", 0) for e in run["evals"]),
        "step_at": [round(p["time"] - run["started_at"], 2) for p in run["metrics"]],
        "eval_at": [round(e["time"] - run["started_at"], 2) for e in run["evals"]],
        "eval_reward": [None if e["reward"] is None else round(e["reward"], 3) for e in run["evals"]],
        "staleness": {k: sum(s["staleness"].get(k, 0) for s in run["version_samples"].values())
                      for k in sorted({k for s in run["version_samples"].values() for k in s["staleness"]})},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--publish-every", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step (default: the run kind's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default: the run kind's)")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the run kind's")
    parser.add_argument("--precision", choices=["float32", "bf16"], default=None,
                        help="the updates' arithmetic (default: the run kind's, float32)")
    parser.add_argument("--max-staleness", type=int, default=1)
    parser.add_argument("--trl-args", type=json.loads, default=None,
                        help='TRL options for both modes, as the run\'s params.trl_args (JSON object), e.g. '
                             '\'{"off_policy_mask_threshold": 0.1}\'')
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--modes", nargs="+", choices=["sync", "async"], default=["sync", "async"])
    parser.add_argument("--update-mode", choices=["swap", "inplace"], default="swap",
                        help="the replicas' LOCKSTEP_UPDATE_MODE: a second engine per version, or weights copied in")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    args = parser.parse_args()
    print(json.dumps(machine()))
    ensure_models(["tiny", "tiny-s1"])  # the initial and substitute models of the cluster
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="async-rl-") as root, \
            local_cluster(Path(root), BENCH_MODELS, replicas=2, LOCKSTEP_DTYPE="float32",
                          LOCKSTEP_UPDATE_MODE=args.update_mode) as cluster:
        trainer = start_trainer(cluster)
        if args.pin:
            for replica in cluster.replicas:
                pin(replica.process.pid, 1)
            pin(trainer.process.pid, 0)
        # A one-step run first: the trainer imports TRL at its first run, and neither mode should pay for that.
        run_once(trainer, {"model": "builtin:tiny", "steps": 1, "publish_every": 1, "seed": 0, "async": False,
                           "max_staleness": 0, "eval_prompts": 0}, args.threshold)
        for seed in args.seeds:
            modes = [m == "async" for m in args.modes]
            for is_async in modes if seed % 2 == 0 else modes[::-1]:  # alternate which mode goes first
                params = {"model": "builtin:tiny", "steps": args.steps, "publish_every": args.publish_every,
                          "seed": seed, "async": is_async, "max_staleness": args.max_staleness if is_async else 0}
                params |= {k: v for k, v in (("batch_size", args.batch_size), ("learning_rate", args.learning_rate),
                                             ("max_new_tokens", args.max_new_tokens), ("precision", args.precision),
                                             ("trl_args", args.trl_args)) if v is not None}
                result = run_once(trainer, params, args.threshold)
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\n| mode | seed | reward ≥ {args.threshold} after | at version | run total | used | dropped stale | "
          "beyond bound | failed | mislabeled |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        reached = f"{r['reached_s']} s" if r["reached_s"] is not None else "not reached"
        print(f"| {r['mode']} | {r['seed']} | {reached} | {r['reached_version']} | {r['total_s']} s | {r['used']} | "
              f"{r['dropped_stale']} | {r['beyond_bound']} | {r['failed']} | {r['mislabeled']} |")
    # A run that never reached the threshold counts as never (infinitely late), not as absent.
    times = {m: [math.inf if r["reached_s"] is None else r["reached_s"] for r in results if r["mode"] == m]
             for m in ("sync", "async")}
    if times["sync"] and times["async"]:
        sync_s, async_s = statistics.median(times["sync"]), statistics.median(times["async"])
        print(f"\nmedian time to the threshold (a run that missed it counts as never): sync {sync_s:.1f} s, "
              f"async {async_s:.1f} s, async/sync = {async_s / sync_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
