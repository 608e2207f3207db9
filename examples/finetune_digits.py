"""Start a ``finetune`` run on a running trainer and follow it: a progress bar, then reward per version.

    lockstep up --shared var/shared &
    python examples/finetune_digits.py --trainer http://127.0.0.1:8090 --steps 30 --publish-every 3

The built-in ``digits`` task rewards the share of digits in an answer; the tiny random model learns it within
a few versions, and the replicas' answers change with each version.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lockstep.core.settings import load_settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainer", default="http://127.0.0.1:8090")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--publish-every", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="{}", help="more run parameters as JSON")
    parser.add_argument("--json", default=None, help="write the finished run here")
    args = parser.parse_args()
    token = load_settings().api_token  # LOCKSTEP_API_TOKEN, when the trainer wants one
    client = httpx.Client(base_url=args.trainer.rstrip("/"), timeout=30,
                          headers={"Authorization": f"Bearer {token}"} if token else {})
    params = {"steps": args.steps, "publish_every": args.publish_every, "learning_rate": args.learning_rate,
              "task": args.task, "seed": args.seed, **json.loads(args.params)}
    created = client.post("/runs", json={"kind": "finetune", "params": params})
    if created.status_code != 201:
        print(f"refused ({created.status_code}): {created.json()['error']['message']}", file=sys.stderr)
        return 1
    run_id = created.json()["id"]
    console = Console()
    started = time.monotonic()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), TextColumn("{task.fields[message]}"), console=console) as bar:
        task = bar.add_task(run_id, total=1.0, message="")
        while True:
            run = client.get(f"/runs/{run_id}").json()
            bar.update(task, completed=run["progress"]["fraction"], message=run["progress"]["message"])
            if not run["active"]:
                break
            time.sleep(1.0)
    table = Table("version", "step", "held-out reward", "s since previous", "a replica's answer")
    answers = {s["version"]: s["answer"] for s in run["samples"]}
    for e in run["evals"]:
        reward = f"{e['reward']:.3f}" if e["reward"] is not None else "-"
        table.add_row(f"v{e['version']}", str(e["step"]), reward, f"{e['seconds']:.1f}",
                      repr(answers.get(e["version"], ""))[:48])
    console.print(table)
    console.print(f"run {run_id} {run['status']} in {time.monotonic() - started:.0f} s"
                  + (f": {run['error']}" if run["error"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(run, f, indent=1)
    return 0 if run["status"] == "succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
