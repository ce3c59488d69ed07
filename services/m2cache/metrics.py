"""Small shared Prometheus helpers.

Each service owns a :class:`prometheus_client.CollectorRegistry` (no global
registry), so several services can live in one process (tests, benchmarks)
without duplicate-metric errors. ``start_metrics_server(port, registry)``
exposes it over HTTP; port 0 means off.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

# Fetch latencies run from ~100 us (a few cached records) to seconds (a cold layer).
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def start_metrics_server(port: int, registry: CollectorRegistry, addr: str = "127.0.0.1"):
    """Serve ``registry`` at http://addr:port/metrics; returns (server, thread) or None when port is 0."""
    if not port:
        return None
    from m2cache.security import AUTH_REGISTRY  # refused-token counts, process-wide

    server, thread = start_http_server(port, addr=addr, registry=_Merged(registry, AUTH_REGISTRY))
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return server, thread


class RpcMetrics:
    """Per-RPC latency histogram and request counter by status code."""

    def __init__(self, service: str, registry: CollectorRegistry):
        self.latency = Histogram(f"m2cache_{service}_rpc_seconds", "RPC latency", ["rpc"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter(f"m2cache_{service}_rpc_requests", "RPCs handled", ["rpc", "code"], registry=registry)

    @contextmanager
    def observe(self, rpc: str) -> Iterator[None]:
        """Time one RPC; the status code is "OK" or the exception class name."""
        start = time.perf_counter()
        code = "OK"
        try:
            yield
        except Exception as err:
            code = getattr(err, "code", type(err).__name__)
            raise
        finally:
            self.latency.labels(rpc).observe(time.perf_counter() - start)
            self.requests.labels(rpc, str(code)).inc()


class _Merged:
    """Collects from several registries (what start_http_server needs is ``collect``)."""

    def __init__(self, *registries: CollectorRegistry):
        self.registries = registries

    def collect(self):
        for r in self.registries:
            yield from r.collect()
