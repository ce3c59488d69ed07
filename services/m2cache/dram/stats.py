"""DramTier statistics: the counters GetStats returns, mirrored to Prometheus."""
from __future__ import annotations

import threading
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge

from m2cache.metrics import RpcMetrics


class TierStats:
    """Thread-safe counters. Bytes and records "served" are what callers received."""

    def __init__(self, registry: CollectorRegistry):
        self._lock = threading.Lock()
        self.per_layer: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])  # (model, layer) -> [hits, misses]
        self.bytes_from_redis = 0
        self.bytes_from_store = 0
        self.bytes_preloaded = 0
        self.preloads = 0
        self.preloads_skipped = 0
        self.preload_misses = 0
        self.checksum_refetches = 0
        self.reports = 0
        self._lead_sum = 0
        self._lead_count = 0
        self.rpc = RpcMetrics("dram", registry)
        self._records = Counter("m2cache_dram_records", "records served", ["model", "layer", "source"],
                                registry=registry)
        self._bytes = Counter("m2cache_dram_bytes", "bytes moved", ["source"], registry=registry)
        self._events = Counter("m2cache_dram_events", "policy events", ["event"], registry=registry)
        self.resident_bytes = Gauge("m2cache_dram_resident_bytes", "bytes of records in Redis", registry=registry)
        self.budget_bytes = Gauge("m2cache_dram_budget_bytes", "Redis byte budget", registry=registry)
        self.redis_up = Gauge("m2cache_dram_redis_up", "1 when Redis is in use", registry=registry)

    def served(self, model: str, layer: int, hits: int, misses: int, bytes_redis: int, bytes_store: int) -> None:
        with self._lock:
            counts = self.per_layer[(model, layer)]
            counts[0] += hits
            counts[1] += misses
            self.bytes_from_redis += bytes_redis
            self.bytes_from_store += bytes_store
        self._records.labels(model, str(layer), "redis").inc(hits)
        self._records.labels(model, str(layer), "store").inc(misses)
        self._bytes.labels("redis").inc(bytes_redis)
        self._bytes.labels("store").inc(bytes_store)

    def preloaded(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_preloaded += nbytes
        self._bytes.labels("preload").inc(nbytes)

    def preload_done(self, lead: int | None) -> None:
        with self._lock:
            self.preloads += 1
            if lead is not None:
                self._lead_sum += lead
                self._lead_count += 1
        self._events.labels("preload").inc()

    def event(self, name: str) -> None:
        """``preload_miss``, ``preload_skipped``, ``checksum_refetch`` or ``report``."""
        with self._lock:
            attr = {"preload_miss": "preload_misses", "preload_skipped": "preloads_skipped",
                    "checksum_refetch": "checksum_refetches", "report": "reports"}[name]
            setattr(self, attr, getattr(self, attr) + 1)
        self._events.labels(name).inc()

    @property
    def mean_preload_lead(self) -> float:
        with self._lock:
            return self._lead_sum / self._lead_count if self._lead_count else 0.0

    def layer_counts(self) -> list[tuple[str, int, int, int]]:
        with self._lock:
            return [(m, layer, h, mi) for (m, layer), (h, mi) in sorted(self.per_layer.items())]
