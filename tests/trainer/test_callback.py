"""The callback example: transformers' Trainer on the tiny model publishes each checkpoint; replicas serve
it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lockstep.store import ModelStore
from tests.support.cluster import REPO, LocalCluster

pytestmark = pytest.mark.e2e


def test_the_callback_example_publishes_checkpoints_that_the_replicas_serve(cluster: LocalCluster) -> None:
    before = max(int(p.status()["serving_version"]) for p in cluster.replicas)
    done = subprocess.run([sys.executable, str(REPO / "examples" / "train_with_callback.py"),
                           "--shared", str(cluster.shared), "--output", str(cluster.root / "callback-run"),
                           "--steps", "4", "--save-steps", "2", "--batch-size", "4"],
                          env=cluster.env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("v")]
    versions = [int(line.split()[0][1:]) for line in lines]
    assert len(versions) == 2 and versions[0] > before and versions[1] == versions[0] + 1
    assert all(" committed: " in line for line in lines)
    for proc in cluster.replicas:  # the callback waited until every replica served it
        status = proc.status()
        assert status["serving_version"] == versions[-1] and status["ready"]
        answer = proc.post("/generate", json={"prompt": "Once upon a time", "max_new_tokens": 4})
        assert answer.headers["X-Model-Version"] == str(versions[-1])
    # Only model files were published: the checkpoint's optimizer and RNG pickles stayed behind.
    published = sorted(f.path for f in ModelStore(cluster.shared).get(versions[-1]).files)
    assert "model.safetensors" in published and "tokenizer.json" in published
    assert not [n for n in published if n.endswith((".pt", ".pth", ".bin"))]
