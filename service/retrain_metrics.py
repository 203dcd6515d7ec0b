"""The retrain worker's Prometheus instruments, on an injected registry.

    kdgate_retrain_webhooks_total{outcome}        accepted | duplicate | ignored | unauthorized |
                                                  bad_request | too_large
    kdgate_retrain_jobs_total{model,outcome}      succeeded | failed (finished jobs)
    kdgate_retrain_jobs_running                   jobs running now
    kdgate_retrain_stage_seconds{stage}           time per stage of finished stages

The job counter is the one to alert on: `increase(kdgate_retrain_jobs_total{outcome="failed"}[1h])`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, float("inf"))


class WorkerMetrics:
    """Every instrument of the worker; tests pass a fresh `CollectorRegistry()`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.webhooks = Counter(
            "kdgate_retrain_webhooks_total",
            "Retrain webhook requests received, by what the worker answered.",
            ["outcome"],
            registry=registry,
        )
        self.jobs = Counter(
            "kdgate_retrain_jobs_total",
            "Retrain jobs finished, by model and outcome.",
            ["model", "outcome"],
            registry=registry,
        )
        self.running = Gauge(
            "kdgate_retrain_jobs_running", "Retrain jobs running now.", registry=registry
        )
        self.stage_seconds = Histogram(
            "kdgate_retrain_stage_seconds",
            "Time taken by each stage of a retrain job.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
