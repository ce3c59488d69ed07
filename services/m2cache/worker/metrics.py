"""Prometheus view of a worker, read from its counters at scrape time (no
bookkeeping on the per-token path)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class WorkerCollector:
    def __init__(self, runtime):
        self.runtime = runtime

    def collect(self):
        rt = self.runtime
        f, e = rt.fetcher.stats, rt.engine
        n_hit, n_miss, b_hbm, b_fetched = rt.snapshot()
        yield CounterMetricFamily("m2cache_worker_requests", "Generate requests accepted", value=e.requests)
        yield CounterMetricFamily("m2cache_worker_tokens", "tokens generated", value=e.tokens)
        yield GaugeMetricFamily("m2cache_worker_active_requests", "requests decoding or queued", value=e.num_active)
        hits = CounterMetricFamily("m2cache_worker_hbm_lookups", "HBM neuron-cache lookups", labels=["result"])
        hits.add_metric(["hit"], n_hit)
        hits.add_metric(["miss"], n_miss)
        yield hits
        tier = CounterMetricFamily("m2cache_worker_neuron_bytes", "neuron record bytes by source", labels=["tier"])
        tier.add_metric(["hbm"], b_hbm)
        tier.add_metric(["dram_tier"], b_fetched)
        yield tier
        yield CounterMetricFamily("m2cache_worker_fetch_retries", "DramTier call retries", value=f.retries)
        yield CounterMetricFamily("m2cache_worker_fetch_seconds", "time in DramTier neuron fetches", value=f.seconds)
        yield GaugeMetricFamily("m2cache_worker_cache_bytes", "bytes held in the HBM neuron cache",
                                value=rt.cache.num_bytes)
        yield GaugeMetricFamily("m2cache_worker_cache_budget_bytes", "HBM neuron-cache budget",
                                value=rt.cache.budget_bytes)
        yield from rt.energy.metrics()  # joules (RAPL / NVML / modelled), gCO2 and USD per token


def worker_registry(runtime) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(WorkerCollector(runtime))
    return registry
