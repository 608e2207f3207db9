"""Prometheus metrics of one replica (own registry, so several replicas can live in one test process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class ReplicaMetrics:
    """Every metric a replica exports; names follow Prometheus conventions with the ``lockstep_`` prefix."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("lockstep_requests", "Requests answered, by endpoint, status and model version.",
                                ["endpoint", "status", "model_version"], registry=r)
        self.request_latency = Histogram("lockstep_request_latency_seconds", "End-to-end generation latency.",
                                         ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lockstep_time_to_first_token_seconds", "Time from admission to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("lockstep_generated_tokens", "Tokens generated.", registry=r)
        self.tokens_per_request = Histogram("lockstep_request_generated_tokens", "Tokens generated per request.",
                                            buckets=_TOKEN_BUCKETS, registry=r)
        self.tokens_per_second = Gauge("lockstep_tokens_per_second", "Generated tokens per second (last 10 s).",
                                       registry=r)
        self.queue_depth = Gauge("lockstep_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.queue_capacity = Gauge("lockstep_queue_capacity", "Admission queue bound.", registry=r)
        self.running = Gauge("lockstep_running_batch_size", "Sequences in the running batch.", registry=r)
        self.rejected = Counter("lockstep_rejected_requests", "Requests refused with 429.", registry=r)
        self.serving_version = Gauge("lockstep_serving_version", "Version this replica serves (-1: none).",
                                     registry=r)
        self.staged_version = Gauge("lockstep_staged_version", "Version staged beside the served one (-1: none).",
                                    registry=r)
        self.committed_version = Gauge("lockstep_committed_version", "Version the cluster committed (-1: none).",
                                       registry=r)
        self.ready = Gauge("lockstep_ready", "1 when serving the committed version.", registry=r)
        self.swap_duration = Histogram("lockstep_swap_duration_seconds", "Flip duration (admission to new model).",
                                       buckets=_PAUSE_BUCKETS, registry=r)
        self.swap_failures = Counter("lockstep_swap_failures", "Stages or flips that failed.", registry=r)
        self.model_load = Histogram("lockstep_model_load_duration_seconds", "Model load (resolve+load+canary).",
                                    buckets=_LOAD_BUCKETS, registry=r)
        self.inplace_pause = Histogram("lockstep_inplace_pause_seconds", "Admission pause of an in-place update.",
                                       buckets=_PAUSE_BUCKETS, registry=r)
        self.version_mismatches = Counter(
            "lockstep_engine_version_mismatches", "Answers the engine reports as sampled (in part) by weights of "
            "another version than their label (vLLM reports it per answer); must stay 0.", registry=r)
        self.rollout_share = Gauge("lockstep_rollout_share_percent", "Percent of new requests each resident version "
                                   "answers while a rollout's split is in force.", ["model_version"], registry=r)
        self.stage_bytes_fetched = Counter("lockstep_stage_bytes_fetched", "Bytes of new versions placed on local "
                                           "disk at stage, by where they came from: this replica's own copies "
                                           "(local), its peers (peer), the shared folder or trainer (origin).",
                                           ["source"], registry=r)
        self.stage_duration = Histogram("lockstep_stage_duration_seconds", "Seconds to get a version onto local "
                                        "disk at stage, every chunk verified (the load follows).",
                                        buckets=_LOAD_BUCKETS, registry=r)
        self.stage_bad_chunks = Counter("lockstep_stage_bad_chunks", "Peers not asked again during a transfer, "
                                        "by why: digest, truncated, missing, down, refused, slow.", ["reason"],
                                        registry=r)
        self.peer_bytes_served = Counter("lockstep_peer_bytes_served", "Chunk bytes this replica sent to peers.",
                                         registry=r)
        for source in ("local", "peer", "origin"):
            self.stage_bytes_fetched.labels(source=source)
        for g in (self.serving_version, self.staged_version, self.committed_version):
            g.set(-1)

    def set_shares(self, shares: dict[int, float]) -> None:
        """Export the split in force: percent of new requests per version (none: no split)."""
        self.rollout_share.clear()
        for version, share in shares.items():
            self.rollout_share.labels(model_version=str(version)).set(share)


class VllmMetrics:
    """vLLM's own metric families (``vllm:*``) of the engine that serves, for a replica's /metrics.

    vLLM labels them with ``model_name`` (LOCKSTEP_SERVED_MODEL_NAME); the version they belong to is
    ``lockstep_serving_version`` beside them. vLLM registers each engine's in the process-wide registry, where
    a staged version's engine replaces the serving one's (and an aborted one's would stay, frozen): so they are
    read from the serving engine itself (``VllmEngine.prometheus_collectors``).
    """

    def __init__(self, serving: Callable[[], Any]) -> None:
        self._serving = serving  # the replica's serving slot, or None

    def collect(self) -> Iterator[Metric]:
        engine = getattr(self._serving(), "engine", None)
        for collector in getattr(engine, "prometheus_collectors", ()):
            yield from collector.collect()

    def describe(self) -> list[Metric]:
        return []  # nothing to reserve: vLLM's names cannot clash with lockstep_*
