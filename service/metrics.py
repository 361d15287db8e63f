"""Prometheus metrics of the search service, in a registry of their own (one per app).

A histogram per stage of a query (read, decode, queue, encode, search, metadata, total), as
clip-retrieval does, so a slow request says where its time went.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("read", "decode", "queue", "encode", "search", "metadata", "total")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stage_seconds = Histogram(
            "sbir_search_stage_seconds", "Time a /search request spent per stage", ["stage"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.searches = Counter(
            "sbir_search_requests",
            "/search answers by outcome and input form",
            ["outcome", "form"],
            registry=r,
        )
        self.batch_size = Histogram(
            "sbir_batch_size", "Sketches encoded per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "sbir_batch_seconds", "Time per batched encode + search", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("sbir_queue_depth", "Sketches waiting for the encoder", registry=r)
        self.index_vectors = Gauge(
            "sbir_index_vectors", "Vectors in the serving snapshot's index", registry=r
        )
        self.snapshot_info = Gauge(
            "sbir_snapshot_info",
            "The serving snapshot (value 1) and its model",
            ["snapshot", "model"],
            registry=r,
        )
        self.reloads = Counter("sbir_snapshot_reloads", "Snapshot loads by outcome", ["outcome"], registry=r)
        self.ready = Gauge("sbir_ready", "1 when a snapshot and its model are serving", registry=r)
        self.snapshot_on_disk = Gauge(
            "sbir_snapshot_on_disk",
            "0 when the serving snapshot's folder has disappeared from disk (it keeps serving from memory)",
            registry=r,
        )
        self.refused_pending = Gauge(
            "sbir_snapshot_refused",
            "1 while CURRENT names a snapshot that was refused (the previous one keeps serving)",
            registry=r,
        )

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_stages(self, timings_s: dict[str, float]) -> None:
        for stage, seconds in timings_s.items():
            self.stage_seconds.labels(stage).observe(seconds)

    def serving(self, snapshot_id: str, model_sha256: str, vectors: int) -> None:
        self.snapshot_info.clear()
        self.snapshot_info.labels(snapshot_id, model_sha256[:16]).set(1)
        self.index_vectors.set(vectors)
        self.ready.set(1)
        self.snapshot_on_disk.set(1)
        self.refused_pending.set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
