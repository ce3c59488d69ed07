"""What a policy's choices cost the worker's HBM cache: the bytes it would fetch.

A policy fills its byte budget with the bands of one token (search.py), and the
worker's cache is that budget (worker/runtime.build_cache), so every neuron that
enters a band is a miss the worker reads from DRAM or SSD. Policies at one budget
differ widely in this churn: a mixed split whose neurons move between INT8 and
INT4 from token to token misses several times as often as one precision alone
(SmolLM2-135M at 25%: 9.3% of the FFN bytes fetched per token vs 2.7%,
docs/BENCHMARKS.md). ``MissCounter`` wraps a choose function and runs the
worker's own cache bookkeeping (NeuronCache: the same capacities, window and
eviction; one-byte stand-in records, so it costs no memory) over the choices,
counting the bytes each miss would move at its real record size.
"""
from __future__ import annotations

from dataclasses import fields

import torch

from m2cache.codec.format import Manifest, Precision
from m2cache.worker.config import WorkerConfig
from m2cache.worker.neuron_cache import NeuronCache
from m2cache.worker.runtime import cache_capacities

DEFAULT_WINDOW = next(f.default for f in fields(WorkerConfig) if f.name == "window")  # the worker's


class MissCounter:
    """Misses of the worker's cache at ``fraction`` of the FULL FFN bytes under the
    band ratios ``ratios`` (dict as a policy stores them). Steps are counted at layer 0;
    the first step (a cold cache fills) is not counted."""

    def __init__(self, manifest: Manifest, fraction: float, ratios: dict[str, float],
                 window: int = DEFAULT_WINDOW):
        self.record_bytes = {p: manifest.layout.num_bytes(p) for p in Precision}
        # the worker's bookkeeping over one-byte stand-in records: its misses, none of its memory
        self.cache = NeuronCache(manifest.num_layers, manifest.d_ffn, {p: 1 for p in Precision},
                                 cache_capacities(manifest, fraction, ratios), window)
        self.layer_bytes = manifest.d_ffn * self.record_bytes[Precision.FULL]
        self.step = 0
        self.missed_bytes = 0
        self.counted_layers = 0

    def wrap(self, choose):
        """A choose function that also feeds its choices through the cache."""
        def counted(layer: int, x: torch.Tensor) -> dict[Precision, torch.Tensor]:
            choice = choose(layer, x)
            if layer == 0:
                self.step += 1
            want = {Precision(p): torch.as_tensor(ids).reshape(-1).cpu().sort().values for p, ids in choice.items()}
            self.cache.bands(layer, want, self.step, self._take)
            if self.step > 1:
                self.counted_layers += 1
            return choice
        return counted

    def _take(self, prec: Precision, miss_ids: torch.Tensor) -> torch.Tensor:
        if self.step > 1:
            self.missed_bytes += int(miss_ids.numel()) * self.record_bytes[prec]
        return torch.zeros((miss_ids.numel(), 1), dtype=torch.uint8)

    @property
    def miss_fraction(self) -> float:
        """Bytes fetched per layer and token, as a fraction of the layer's FULL FFN bytes."""
        return self.missed_bytes / (self.counted_layers * self.layer_bytes) if self.counted_layers else 0.0
