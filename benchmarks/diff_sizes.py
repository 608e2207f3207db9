"""How much of a version the trainer's own fine-tune runs change, one version to the next.

    python benchmarks/diff_sizes.py --steps 6 --json var/diff-sizes.json

Two real replicas on a shared folder and a real trainer (``tests.support.cluster``) run a ``finetune`` run on the
built-in tiny model and the ``digits`` task, publishing every step. Then, for each version and the one before:

* ``new_bytes``: the bytes of chunks the store did not hold (what a publish writes and a replica fetches);
* the tensors whose bytes changed at all, and the elements that changed, to show what finer-grained deltas
  would add on top of per-tensor chunks;
* what the replicas fetched, by source (their ``lockstep_stage_bytes_fetched_total``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BENCH_MODELS, ensure_models, machine
from tests.support.cluster import Proc, free_port, local_cluster, spawn, wait_for

from lockstep.store import ModelStore


def fetched(proc: Proc) -> dict[str, float]:
    values = {}
    for line in proc.get("/metrics").text.splitlines():
        if line.startswith("lockstep_stage_bytes_fetched_total{"):
            values[line.split('source="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return values


def compare(store: ModelStore, old: int, new: int) -> dict[str, Any]:
    """Per-tensor and per-element change between two versions' weights."""
    from safetensors.torch import load_file

    a = load_file(str(store.path_of(old) / "model.safetensors"))
    b = load_file(str(store.path_of(new) / "model.safetensors"))
    changed_tensors = changed_elements = elements = 0
    for name, tensor in b.items():
        same = a[name].view(-1) == tensor.view(-1)
        elements += tensor.numel()
        changed = int((~same).sum())
        changed_elements += changed
        changed_tensors += changed > 0
    manifest = store.get(new)
    return {"version": new, "parent": old, "total_bytes": manifest.total_size, "new_bytes": manifest.new_bytes,
            "new_fraction": round((manifest.new_bytes or 0) / manifest.total_size, 4),
            "tensors": len(b), "tensors_changed": changed_tensors,
            "elements_changed_fraction": round(changed_elements / elements, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ensure_models(["tiny", "tiny-s1"])  # the initial and substitute models of the cluster
    with tempfile.TemporaryDirectory(prefix="lockstep-diff-") as tmp, \
            local_cluster(Path(tmp), BENCH_MODELS, replicas=2) as cluster:
        port = free_port()
        urls = ",".join(r.url for r in cluster.replicas)
        trainer = spawn("trainer", ["trainer", "--port", str(port)],
                        cluster.env(INFERENCE_URLS=urls, LOCKSTEP_DISCOVERY="static", LOCKSTEP_KEEP_VERSIONS="50"),
                        cluster.root / "logs", port)
        cluster.others.append(trainer)
        wait_for(lambda: trainer.get("/ready").status_code == 200, 120, 0.2, "the trainer to be ready")
        before = {r.name: fetched(r) for r in cluster.replicas}
        params = {"model": "builtin:tiny", "task": "digits", "steps": args.steps, "publish_every": 1,
                  "seed": args.seed}
        created = trainer.post("/runs", json={"kind": "finetune", "params": params})
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        started = time.monotonic()
        run = wait_for(lambda: (r := trainer.get(f"/runs/{run_id}").json())["active"] is False and r, 1800, 1.0,
                       "the finetune run to end")
        store = ModelStore(cluster.shared)
        versions = [m.version for m in store.list()]
        pairs = [compare(store, old, new) for old, new in zip(versions, versions[1:], strict=False)]
        by_replica = {r.name: {k: v - before[r.name].get(k, 0) for k, v in fetched(r).items()}
                      for r in cluster.replicas}
    result = {"machine": machine(), "run": {"status": run["status"], "steps": args.steps,
                                            "seconds": round(time.monotonic() - started, 1)},
              "versions": versions, "pairs": pairs, "replicas_fetched": by_replica}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
