"""Prometheus metrics of the service, in a registry of its own (two apps in one process never share counters).

Names follow Prometheus' conventions (``_total`` counters, ``_seconds`` units, base units only)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """Requests by endpoint and status, their latency, batch sizes and run times, queue depth, readiness."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("medxai_requests_total", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("medxai_request_latency_seconds", "Time from request to response, by endpoint",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("medxai_batch_size", "Requests per model batch, by kind (predict, explain)",
                                    ["kind"], buckets=_BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("medxai_batch_seconds", "Model time per batch, by kind", ["kind"],
                                       buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("medxai_queue_depth", "Requests admitted and not yet answered",
                                 registry=self.registry)
        self.ready = Gauge("medxai_ready", "1 once the model is loaded and warmed up", registry=self.registry)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind=kind).observe(size)
        self.batch_seconds.labels(kind=kind).observe(seconds)

    def exposition(self) -> bytes:
        """The text format ``GET /metrics`` answers."""
        return generate_latest(self.registry)
