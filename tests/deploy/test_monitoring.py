"""The alert rules and the dashboard: valid PromQL, alerts that fire when they should, real metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from lockstep.inference.metrics import ReplicaMetrics
from lockstep.trainer.server.metrics import TrainerMetrics

from . import K8S, REPO, find, load_file, run, tool

PROMTOOL = tool("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'; `make test` installs it)"
)

RULE = find(load_file(K8S / "monitoring" / "prometheusrule.yaml"), "PrometheusRule", "lockstep-alerts").body
DASHBOARD = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
SCRAPE_SERIES = {"up"}
SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["_sum", "_count", ""]}


def replica_series() -> set[str]:
    """Every series name a replica can export, from its real metric definitions."""
    registry = CollectorRegistry()
    ReplicaMetrics(registry)
    return {family.name + s for family in registry.collect() for s in SUFFIXES.get(family.type, [""])}


def trainer_series() -> set[str]:
    """Every series name the trainer exports, from its real metric definitions."""
    return {family.name + s for family in TrainerMetrics().registry.collect()
            for s in SUFFIXES.get(family.type, [""])}


def alerts() -> list[dict[str, Any]]:
    return [r for g in RULE["spec"]["groups"] for r in g["rules"] if "alert" in r]


def dashboard_exprs() -> list[tuple[int, str, str]]:
    return [(p["id"], t["refId"], t["expr"]) for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    names = set(re.findall(r"\b(lockstep_[a-z0-9_]+)\b", no_strings))
    return names | ({"up"} if re.search(r"\bup\{", no_strings) else set())


def write_rules(tmp_path: Path, spec: dict[str, Any], name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@needs_promtool
def test_promtool_accepts_the_alert_rules(tmp_path: Path) -> None:
    done = run([PROMTOOL, "check", "rules", str(write_rules(tmp_path, RULE["spec"]))])
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_and_dashboard_use_only_metrics_that_exist() -> None:
    known = replica_series() | trainer_series() | SCRAPE_SERIES
    used = {name: f"alert {r['alert']}" for r in alerts() for name in metric_names(r["expr"])}
    used |= {
        name: f"dashboard panel {pid}" for pid, _, expr in dashboard_exprs() for name in metric_names(expr)
    }
    unknown = {name: where for name, where in used.items() if name not in known}
    assert not unknown, f"metrics that no Lockstep process exports: {unknown}"
    assert "lockstep_ready" in used and "lockstep_serving_version" in used


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    operations = (REPO / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", operations, flags=re.M)
    }
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for alert in alerts():
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]
        runbook = alert["annotations"]["runbook"]
        assert runbook.startswith("docs/operations.md#"), alert["alert"]
        assert runbook.split("#", 1)[1] in anchors, (
            f"{alert['alert']}: docs/operations.md has no section {runbook}"
        )


# --- promtool unit tests: the alerts fire when they should, and only then ---------------------------------


def _series(metric: str, pod: str, values: str, **labels: str) -> dict[str, str]:
    all_labels = {"namespace": "lockstep", "pod": pod, "job": "inference"} | labels
    return {
        "series": metric + "{" + ",".join(f'{k}="{v}"' for k, v in all_labels.items()) + "}",
        "values": values,
    }


def _firing(pod: str | None = None, severity: str = "warning", **labels: str) -> dict[str, Any]:
    expected = {"severity": severity, "namespace": "lockstep"} | labels
    if pod is not None:
        expected |= {"pod": pod, "job": "inference"}
    return {"exp_labels": expected}


UNIT_TESTS: list[dict[str, Any]] = [
    {  # one replica stops being ready at 1m: pending until 6m, then firing; the ready one never fires
        "interval": "1m",
        "input_series": [_series("lockstep_ready", "a", "1 0x15"), _series("lockstep_ready", "b", "1x15")],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "LockstepReplicaNotReady", "exp_alerts": []},
            {"eval_time": "7m", "alertname": "LockstepReplicaNotReady", "exp_alerts": [_firing("a")]},
            {"eval_time": "7m", "alertname": "LockstepNoReadyReplicas", "exp_alerts": []},
        ],
    },
    {  # every replica unready: the fleet-wide alert fires after 2 minutes
        "interval": "1m",
        "input_series": [_series("lockstep_ready", "a", "0x5"), _series("lockstep_ready", "b", "0x5")],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "LockstepNoReadyReplicas", "exp_alerts": []},
            {
                "eval_time": "3m",
                "alertname": "LockstepNoReadyReplicas",
                "exp_alerts": [_firing(severity="critical")],
            },
        ],
    },
    {  # b stays on version 2 while a serves 3; c is booting (-1) and does not count as a split
        "interval": "1m",
        "input_series": [
            _series("lockstep_serving_version", "a", "2 3x15"),
            _series("lockstep_serving_version", "b", "2x15"),
            _series("lockstep_serving_version", "c", "-1x15"),
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "LockstepFleetVersionSplit", "exp_alerts": []},
            {"eval_time": "8m", "alertname": "LockstepFleetVersionSplit", "exp_alerts": [_firing()]},
        ],
    },
    {  # all replicas on 3, one still booting: no split
        "interval": "1m",
        "input_series": [
            _series("lockstep_serving_version", "a", "3x15"),
            _series("lockstep_serving_version", "b", "3x15"),
            _series("lockstep_serving_version", "c", "-1x15"),
        ],
        "alert_rule_test": [{"eval_time": "12m", "alertname": "LockstepFleetVersionSplit", "exp_alerts": []}],
    },
    {  # a is ready while serving 2 with 3 committed (a bug); b is behind but honestly unready; c was never told
        "interval": "1m",
        "input_series": [
            _series("lockstep_serving_version", "a", "2x5"),
            _series("lockstep_committed_version", "a", "3x5"),
            _series("lockstep_ready", "a", "1x5"),
            _series("lockstep_serving_version", "b", "2x5"),
            _series("lockstep_committed_version", "b", "3x5"),
            _series("lockstep_ready", "b", "0x5"),
            _series("lockstep_serving_version", "c", "2x5"),
            _series("lockstep_committed_version", "c", "-1x5"),
            _series("lockstep_ready", "c", "1x5"),
        ],
        "alert_rule_test": [
            {
                "eval_time": "3m",
                "alertname": "LockstepReadyReplicaOffCommitted",
                "exp_alerts": [_firing("a", severity="critical")],
            },
        ],
    },
    {  # a's queue is 90% full for minutes, b's 40%
        "interval": "1m",
        "input_series": [
            _series("lockstep_queue_depth", "a", "230x10"),
            _series("lockstep_queue_capacity", "a", "256x10"),
            _series("lockstep_queue_depth", "b", "100x10"),
            _series("lockstep_queue_capacity", "b", "256x10"),
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "LockstepQueueSaturated", "exp_alerts": []},
            {"eval_time": "7m", "alertname": "LockstepQueueSaturated", "exp_alerts": [_firing("a")]},
        ],
    },
    {  # the trainer aborts one publish at 2m; committed publishes never alert
        "interval": "1m",
        "input_series": [
            _series("lockstep_publish_total", "trainer", "0 0 1x10", outcome="aborted", job="trainer"),
            _series("lockstep_publish_total", "trainer", "0 1 2 3x10", outcome="committed", job="trainer"),
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "LockstepPublishFailed", "exp_alerts": []},
            {
                "eval_time": "3m",
                "alertname": "LockstepPublishFailed",
                "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "lockstep", "outcome": "aborted"}}
                ],
            },
        ],
    },
    {  # a's candidate sits staged 30 minutes for a rollout (its split in force): not stuck; b's is stuck
        "interval": "1m",
        "input_series": [
            _series("lockstep_staged_version", "a", "4x40"),
            _series("lockstep_committed_version", "a", "3x40"),
            _series("lockstep_rollout_share_percent", "a", "25x40", model_version="4"),
            _series("lockstep_staged_version", "b", "4x40"),
            _series("lockstep_committed_version", "b", "3x40"),
        ],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "LockstepUpdateStuck", "exp_alerts": [_firing("b")]},
        ],
    },
    {  # the gates roll a rollout back at 3m; a person's abort at 1m does not alert
        "interval": "1m",
        "input_series": [
            _series("lockstep_rollouts_total", "trainer", "0 1x10", outcome="rolled back", trigger="person",
                    job="trainer"),
            _series("lockstep_rollouts_total", "trainer", "0 0 0 1x10", outcome="rolled back", trigger="gates",
                    job="trainer"),
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "LockstepRolloutRolledBack", "exp_alerts": []},
            {"eval_time": "4m", "alertname": "LockstepRolloutRolledBack",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "lockstep"}}]},
        ],
    },
    {  # a stage fails on b at 2m
        "interval": "1m",
        "input_series": [
            _series("lockstep_swap_failures_total", "a", "0x10"),
            _series("lockstep_swap_failures_total", "b", "0 0 1x10"),
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "LockstepSwapFailures", "exp_alerts": []},
            {"eval_time": "4m", "alertname": "LockstepSwapFailures", "exp_alerts": [_firing("b")]},
        ],
    },
]


@needs_promtool
def test_alerts_fire_exactly_when_they_should(tmp_path: Path) -> None:
    # Annotations are templates checked by `promtool check rules`; leaving them out here keeps each
    # expected alert to its labels.
    spec = json.loads(json.dumps(RULE["spec"]))
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = write_rules(tmp_path, spec)
    tests = tmp_path / "tests.yaml"
    tests.write_text(
        yaml.safe_dump(
            {"rule_files": [rules.name], "evaluation_interval": "1m", "tests": UNIT_TESTS}, sort_keys=False
        )
    )
    done = run([PROMTOOL, "test", "rules", str(tests)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: an expression with a syntax error is refused."""
    spec = {"groups": [{"name": "g", "rules": [{"alert": "Broken", "expr": "sum by (pod (lockstep_ready)"}]}]}
    done = run([PROMTOOL, "check", "rules", str(write_rules(tmp_path, spec))])
    assert done.returncode != 0


# --- the dashboard ---------------------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert DASHBOARD["uid"] and DASHBOARD["title"]
    assert {v["name"] for v in DASHBOARD["templating"]["list"]} == {"datasource", "namespace"}
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['id']} is wider than the grid"
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                assert 'namespace="$namespace"' in target["expr"], (
                    f"{panel['title']}: not filtered by namespace"
                )
    kustomization = yaml.safe_load((K8S / "monitoring" / "kustomization.yaml").read_text())
    files = [f for g in kustomization["configMapGenerator"] for f in g["files"]]
    assert any(f.endswith("=grafana-dashboard.json") for f in files)


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [
        {
            "record": f"dashboard:panel_{pid}_{ref}",
            "expr": expr.replace("$namespace", "lockstep").replace("$__rate_interval", "5m"),
        }
        for pid, ref, expr in dashboard_exprs()
    ]
    done = run(
        [PROMTOOL, "check", "rules", str(write_rules(tmp_path, {"groups": [{"name": "d", "rules": rules}]}))]
    )
    assert done.returncode == 0, done.stdout + done.stderr
