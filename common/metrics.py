"""Prometheus metrics for one app (its own registry, so several apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from common.residency import Event, Reason, Residency

# A wake is a copy from host memory (well under a second) or a load from the page cache or disk (seconds).
WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("embed_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("embed_errors", "Error responses by route and error code", ["route", "code"], registry=r)
        self.latency = Histogram(
            "embed_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.items = Counter("embed_items", "Items embedded, by batcher (images, texts)", ["batcher"], registry=r)
        self.batch_size = Histogram(
            "embed_batch_size", "Items per forward pass", ["batcher"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "embed_queue_wait_seconds",
            "Time an item waits for its batch",
            ["batcher"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "embed_batch_seconds", "Forward pass time", ["batcher"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("embed_queue_depth", "Items waiting for the model", ["batcher"], registry=r)
        self.load_seconds = Gauge("embed_model_load_seconds", "Model load and warm-up time", registry=r)
        self.ready = Gauge("embed_ready", "1 when requests are served", registry=r)
        self.model_state = Gauge(
            "embed_model_state", "1 for the model's state: awake, asleep, waking or held", ["state"], registry=r
        )
        self.sleeps = Counter(
            "embed_sleeps", "Times the model went to sleep, by reason (idle, admin)", ["reason"], registry=r
        )
        self.wakes = Counter("embed_wakes", "Times the model woke, by reason (request, admin)", ["reason"], registry=r)
        self.wake_seconds = Histogram("embed_wake_seconds", "Time a wake took", buckets=WAKE_BUCKETS, registry=r)
        self.gpu_memory = Gauge("embed_gpu_memory_bytes", "CUDA memory held by this process", ["kind"], registry=r)
        # The request counter's and latency's children by (route, status): looking a child up by its labels takes a
        # lock and a tuple of strings, on every request. Routes are templates and statuses few, so this stays small.
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        # The batch metrics' children by batcher, for the same reason (a one-text request is a batch of its own).
        self._batch_children: dict[str, tuple[Counter, Histogram, Histogram, Histogram]] = {}

    def observe_request(self, route: str, status: int, seconds: float, error_code: str | None) -> None:
        """One answered request: counted by route and status (and error code, for an error), its latency by route."""
        children = self._request_children.get((route, status))
        if children is None:
            children = self.requests.labels(route, str(status)), self.latency.labels(route)
            self._request_children[(route, status)] = children
        requests, latency = children
        requests.inc()
        latency.observe(seconds)
        if error_code is not None:
            self.errors.labels(route, error_code).inc()

    def observe_batch(self, batcher: str, size: int, waits: list[float], seconds: float) -> None:
        children = self._batch_children.get(batcher)
        if children is None:
            children = (
                self.items.labels(batcher),
                self.batch_size.labels(batcher),
                self.batch_seconds.labels(batcher),
                self.queue_wait.labels(batcher),
            )
            self._batch_children[batcher] = children
        items, batch_size, batch_seconds, queue_wait = children
        items.inc(size)
        batch_size.observe(size)
        batch_seconds.observe(seconds)
        for wait in waits:
            queue_wait.observe(wait)

    def watch_queue(self, batcher: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(batcher).set_function(depth)

    def watch_residency(self, residency: Residency) -> None:
        from common.residency import STATES

        for state in STATES:
            self.model_state.labels(state).set_function(lambda s=state: float(residency.state == s))  # type: ignore[misc]
        residency.observer = self.observe_residency

    def observe_residency(self, event: Event, reason: Reason, seconds: float) -> None:
        if event == "sleep":
            self.sleeps.labels(reason).inc()
        else:
            self.wakes.labels(reason).inc()
            self.wake_seconds.observe(seconds)

    def watch_gpu_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.gpu_memory.labels("allocated").set_function(torch.cuda.memory_allocated)
            self.gpu_memory.labels("reserved").set_function(torch.cuda.memory_reserved)

    def render(self) -> bytes:
        return generate_latest(self.registry)
