"""The paths and ports the manifests probe and scrape exist on the real apps, and the CLI takes their args."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from lockstep.core.settings import Settings

from . import K8S, REPO, base_objects, find, load_file

# The CLI subcommand each workload runs -> the module whose create_app(settings) builds its app.
APPS = {"serve": "lockstep.inference.app", "trainer": "lockstep.trainer.server.app", "ui": "lockstep.ui.app"}
WORKLOADS = ["inference-server", "trainer-server", "ui-server"]


def container(workload: str) -> dict:
    return find(base_objects(), "Deployment", workload).body["spec"]["template"]["spec"]["containers"][0]


def get_routes(workload: str, tmp_path: Path) -> set[str]:
    """GET paths of the app the workload runs, built as the CLI builds it (lifespan not started)."""
    module = importlib.import_module(APPS[container(workload)["args"][0]])
    app = module.create_app(Settings(shared_dir=tmp_path, inference_urls="", api_token=None))
    return {r.path for r in app.routes if isinstance(r, APIRoute) and "GET" in r.methods}


@pytest.mark.parametrize("workload", WORKLOADS)
def test_probe_paths_exist_on_the_app(workload: str, tmp_path: Path) -> None:
    c = container(workload)
    probed = {c[k]["httpGet"]["path"] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}
    routes = get_routes(workload, tmp_path)
    missing = probed - routes
    assert not missing, (
        f"{workload} probes {sorted(missing)}, which its app does not serve (GET {sorted(routes)})"
    )


@pytest.mark.parametrize("workload", ["inference-server", "trainer-server"])
def test_scraped_path_exists_on_the_app(workload: str, tmp_path: Path) -> None:
    monitor = find(load_file(K8S / "monitoring" / "servicemonitor.yaml"), "ServiceMonitor", "lockstep").body
    paths = {e["path"] for e in monitor["spec"]["endpoints"]}
    assert paths <= get_routes(workload, tmp_path)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_cli_accepts_the_container_args(workload: str) -> None:
    c = container(workload)
    assert c["command"] == ["lockstep"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "lockstep", c["args"][0], "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    flags = [a for a in c["args"] if a.startswith("--")]
    missing = [f for f in flags if f not in done.stdout]
    assert not missing, f"`lockstep {c['args'][0]}` has no {missing}:\n{done.stdout}"
