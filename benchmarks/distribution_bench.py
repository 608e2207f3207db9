"""Distribution testbed: a version from the trainer to N staging nodes over rate-limited links, peers feeding peers.

    sudo .venv/bin/python benchmarks/distribution_bench.py --nodes 16 --rate-mbit 100 --size-mb 64 \\
        --chunk-kib 256 --json var/distribution-testbed.json

Each node is a network namespace (``benchmarks/netns_testbed.py``: veth pairs on one bridge, ``tc`` limits on
every uplink and downlink). Node 0 runs the real trainer (``lockstep trainer``: the store's HTTP routes, the
origin); nodes 1..N run ``benchmarks/staging_node.py``, the replica's own staging (``RemoteStore``) and peer route,
without a model engine. The peers each node asks come from ``lockstep.sync.distribution.chain_peers``, the rule
the coordinator applies. The version is a safetensors file of random tensors, scaled so that S / B matches a
real case (16 GB at 25 Gb/s: 5.1 s).

Phases (each node a fresh process; caches persist between phases like a replica's disk):
1. ``fault-free``: every node stages v1 at one instant.
2. ``killed``: caches emptied, v1 again; ``--kill-fraction`` of the nodes are SIGKILLed at half the fault-free
   time. The survivors' finish is compared with the fault-free one. Then the killed ones restart and stage v1
   with the survivors as peers (the catch-up rule): the bytes they take from the origin must be 0.
3. ``diff``: every node holds v1 and stages v2, which differs in ``--diff-fraction`` of its tensors.

Reported per phase: the last node's time, p50/p99 of per-node completion, origin bytes / S (from the trainer's
``lockstep_store_bytes_served_total`` and from the nodes' own counts), bytes by source. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))

from netns_testbed import Testbed  # noqa: E402

from lockstep.store import ModelStore  # noqa: E402
from lockstep.sync.distribution import chain_peers  # noqa: E402

TOKEN = "testbed-token-0123456789abcdef"
TRAINER_PORT = 8000
NODE_PORT = 8100
TENSOR_BYTES = 256 << 10


def make_versions(root: Path, size_bytes: int, diff_fraction: float, seed: int) -> tuple[Path, Path, float]:
    """Two model folders: v1 of random float16 tensors, v2 with ``diff_fraction`` of the tensors changed."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    count = max(1, size_bytes // TENSOR_BYTES)
    tensors = {f"model.layers.{i:04d}.weight": torch.randn(TENSOR_BYTES // 2, generator=gen).half()
               for i in range(count)}
    v1, v2 = root / "v1", root / "v2"
    for folder in (v1, v2):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "note": "distribution testbed"}))
    save_file(tensors, str(v1 / "model.safetensors"))
    changed = random.Random(seed).sample(sorted(tensors), max(1, round(diff_fraction * count)))
    for name in changed:
        tensors[name] = tensors[name] + 1
    save_file(tensors, str(v2 / "model.safetensors"))
    return v1, v2, len(changed) / count


def served_by_trainer(bed: Testbed, version: int) -> int:
    """``lockstep_store_bytes_served_total{version}`` read from the trainer, from inside its namespace."""
    code = ("import httpx,sys;print(httpx.get(sys.argv[1]).text)")
    out = subprocess.run(["ip", "netns", "exec", bed.netns(0), sys.executable, "-c", code,
                          f"http://{bed.addr(0)}:{TRAINER_PORT}/metrics"], capture_output=True, text=True, timeout=60)
    for line in out.stdout.splitlines():
        if line.startswith("lockstep_store_bytes_served_total") and f'version="{version}"' in line:
            return int(float(line.split()[-1]))
    return 0


def node_url(bed: Testbed, i: int) -> str:
    return f"http://{bed.addr(i)}:{NODE_PORT}"


def start_nodes(bed: Testbed, nodes: list[int], caches: Path, version: int, peers: dict[str, list[str]],
                start_at: float) -> dict[int, subprocess.Popen[bytes]]:
    procs = {}
    for i in nodes:
        argv = [sys.executable, str(REPO / "benchmarks" / "staging_node.py"), "--listen",
                f"{bed.addr(i)}:{NODE_PORT}", "--origin", f"http://{bed.addr(0)}:{TRAINER_PORT}",
                "--cache", str(caches / f"node-{i}"), "--token", TOKEN, "--version", str(version),
                "--peers", ",".join(peers[node_url(bed, i)]), "--start-at", f"{start_at:.3f}"]
        procs[i] = bed.spawn(i, argv, env={"PYTHONPATH": str(REPO / "src")}, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    return procs


def collect(procs: dict[int, subprocess.Popen[bytes]], skip: set[int], timeout_s: float) -> dict[int, dict[str, Any]]:
    results = {}
    for i, proc in procs.items():
        if i in skip:
            continue
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node {i} ended without a result (exit {proc.poll()})")
        results[i] = json.loads(line)
    return results


def stop(bed: Testbed, nodes: list[int]) -> None:
    for i in nodes:
        bed.kill(i)


def summarize(results: dict[int, dict[str, Any]], start_at: float, size: int, trainer_bytes: int) -> dict[str, Any]:
    done = sorted(r["finished"] - start_at for r in results.values())
    late = max(r["ready_at"] - start_at for r in results.values())
    by_source: dict[str, int] = {}
    for r in results.values():
        for source, n in r["bytes_by_source"].items():
            by_source[source] = by_source.get(source, 0) + n
    errors = [r["error"] for r in results.values() if r["error"]]
    return {"nodes": len(results), "last_s": round(done[-1], 3), "p50_s": round(_pct(done, 50), 3),
            "p99_s": round(_pct(done, 99), 3), "per_node_s": [round(d, 3) for d in done],
            "origin_bytes_over_s": round(trainer_bytes / size, 4), "bytes_by_source": by_source,
            "errors": errors, "latest_ready_s": round(late, 3)}


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="lockstep-testbed-"))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    v1_dir, v2_dir, diff = make_versions(work / "models", int(args.size_mb * 1e6), args.diff_fraction, args.seed)
    store = ModelStore(work / "trainer-data")
    m1 = store.publish_dir(v1_dir, chunk_bytes=args.chunk_kib << 10)
    m2 = store.publish_dir(v2_dir, chunk_bytes=args.chunk_kib << 10)
    size = m1.total_size
    caches = work / "caches"
    nodes = list(range(1, args.nodes + 1))
    out: dict[str, Any] = {"nodes": args.nodes, "rate_mbit": args.rate_mbit, "size_bytes": size,
                           "chunk_bytes": args.chunk_kib << 10, "chunks": len(m1.chunk_list()),
                           "diff_fraction": round(diff, 4), "diff_bytes": m2.new_bytes}
    with Testbed(args.nodes + 1, args.rate_mbit, prefix=args.prefix) as bed:
        out["shaping"] = bed.mode()
        out["bytes_per_s"] = bed.rate_bytes_per_s
        out["floor_s"] = round(size / bed.rate_bytes_per_s, 3)
        env = {"LOCKSTEP_TRAINER_DATA_DIR": str(work / "trainer-data"), "LOCKSTEP_API_TOKEN": TOKEN,
               "LOCKSTEP_DISCOVERY": "static", "INFERENCE_URLS": "", "LOCKSTEP_KEEP_VERSIONS": "50",
               "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"),
               "LOCKSTEP_BUILTIN_DIR": str(REPO / "var" / "bench-models")}
        log = (work / "trainer.log").open("wb")
        trainer = bed.spawn(0, [sys.executable, "-m", "lockstep", "trainer", "--host", bed.addr(0), "--port",
                                str(TRAINER_PORT)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_trainer(bed, trainer)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {(work / 'trainer.log').read_text()[-2000:]}") from None
        urls = [node_url(bed, i) for i in nodes]

        def phase(version: int, kill: list[int] | None = None) -> tuple[dict[str, Any], float]:
            before = served_by_trainer(bed, version)
            # The coordinator's rule, with what each node lacks: a chain for v1, a tree for v2's few chunks.
            plan = chain_peers(urls, [], new_bytes=store.get(version).new_bytes, chunk_bytes=args.chunk_kib << 10)
            start_at = time.time() + 3.0 + 0.5 * len(nodes)  # every node listening before any starts
            procs = start_nodes(bed, nodes, caches, version, plan, start_at)
            killed: set[int] = set()
            if kill:
                time.sleep(max(0.0, start_at + args.kill_at_s - time.time()))
                for i in kill:
                    bed.kill(i)
                    killed.add(i)
            results = collect(procs, killed, 600)
            summary = summarize(results, start_at, size, served_by_trainer(bed, version) - before)
            return summary, start_at

        fault_free, _ = phase(1)
        out["fault_free"] = fault_free
        print(json.dumps({"fault_free": fault_free}), flush=True)
        stop(bed, nodes)

        shutil.rmtree(caches, ignore_errors=True)
        count = max(1, math.ceil(args.kill_fraction * len(nodes)))
        victims = random.Random(args.seed).sample(nodes[1:], count)  # never the head: it alone reads the origin
        args.kill_at_s = args.kill_at_s or fault_free["last_s"] / 2
        survivors, _ = phase(1, kill=victims)
        survivors["killed"] = victims
        survivors["kill_at_s"] = round(args.kill_at_s, 3)
        survivors["over_fault_free"] = round(survivors["last_s"] / fault_free["last_s"], 3)
        # The killed ones restart and catch up from the replicas that hold the version.
        holders = [node_url(bed, i) for i in nodes if i not in victims]
        rejoin_plan = chain_peers([node_url(bed, i) for i in victims], holders, seed=1)
        before = served_by_trainer(bed, 1)
        start_at = time.time() + 2.0
        procs = start_nodes(bed, victims, caches, 1, rejoin_plan, start_at)
        rejoined = collect(procs, set(), 600)
        survivors["rejoin"] = summarize(rejoined, start_at, size, served_by_trainer(bed, 1) - before)
        survivors["rejoin_origin_bytes"] = served_by_trainer(bed, 1) - before
        out["killed"] = survivors
        print(json.dumps({"killed": survivors}), flush=True)
        stop(bed, nodes)

        diff_phase, _ = phase(2)
        out["diff"] = diff_phase
        print(json.dumps({"diff": diff_phase}), flush=True)
        stop(bed, nodes)
        bed.kill(0)
    return out


def wait_trainer(bed: Testbed, trainer: subprocess.Popen[bytes]) -> None:
    code = "import httpx,sys;sys.exit(0 if httpx.get(sys.argv[1]).status_code == 200 else 1)"
    for _ in range(600):
        if trainer.poll() is not None:
            raise RuntimeError(f"the trainer exited with {trainer.returncode}")
        probe = subprocess.run(["ip", "netns", "exec", bed.netns(0), sys.executable, "-c", code,
                                f"http://{bed.addr(0)}:{TRAINER_PORT}/healthz"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("the trainer did not answer within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--size-mb", type=float, default=64.0, help="S: 64 MB at 100 Mbit/s is 5.1 s, as 16 GB at "
                        "25 Gb/s")
    parser.add_argument("--chunk-kib", type=int, default=256)
    parser.add_argument("--diff-fraction", type=float, default=0.02)
    parser.add_argument("--kill-fraction", type=float, default=0.05)
    parser.add_argument("--kill-at-s", type=float, default=0.0, help="default: half the fault-free time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="lsd")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
