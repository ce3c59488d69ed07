"""A profile of this machine, measured by the tool itself.

Two kinds of figures, both taken on the store being planned for:
- tier bandwidths from the benchmark's own probes (bench/harness/bandwidth.py:
  the store's cold record reads, the block device, Redis MGET, memory), plus the
  same cold record read over whole layers (contiguous runs);
- the engine's per-token overhead (``probe_engine``): decode steps of the store's
  model through the benchmark's systems (bench/harness/systems_local.py) with the
  FFN restricted to a few probe layers, so each figure is a difference of two
  measured step times: no neurons at all (the fixed per-layer and per-token cost),
  the FFN resident as float32 (the compute rate), and records at each precision
  through the worker's cache, as hits and as misses read from a warm local store
  (seconds per record byte). None of these is a configuration the benchmark runs.

Needs a source checkout (the benchmark harness lives in ``bench/``).
"""
from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from m2cache.codec.format import Precision
from m2cache.errors import FailedPrecondition

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]


def harness():
    """The benchmark harness package (``bench.harness``) of this checkout."""
    if not (REPO / "bench" / "harness" / "run.py").is_file():
        raise FailedPrecondition(f"measuring needs a source checkout (no bench/harness under {REPO})")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import bench.harness as pkg

    return pkg


class _Restricted:
    """An FFN callable that gives ``inner``'s neurons on ``layers`` and none elsewhere
    (``empty`` answers the others): both are opaque providers."""

    def __init__(self, inner, empty, layers: frozenset[int]):
        self.inner, self.empty, self.layers = inner, empty, layers

    def __call__(self, layer: int, x: torch.Tensor):
        return (self.inner if layer in self.layers else self.empty)(layer, x)


def _choose_on(layers: frozenset[int], prec: Precision | None, num_neurons: int):
    """Every neuron at ``prec`` on ``layers``, nothing elsewhere (nothing at all when prec is None)."""
    all_ids = torch.arange(num_neurons)

    def choose(layer: int, x: torch.Tensor) -> dict:
        return {prec: all_ids} if prec is not None and layer in layers else {}

    return choose


def _step_seconds(model, prompt: list[int], ffn, tokens: int, before_step=lambda: None) -> float:
    """Median seconds of a decode step (prefill and one warm-up token excluded)."""
    from bench.harness.systems_local import greedy_loop

    stamps: list[float] = []
    greedy_loop(model, prompt, 2 + tokens, ffn, lambda i, t: stamps.append(time.perf_counter()), before_step)
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    if not steps:
        raise RuntimeError("the probe model stopped at EOS before the measured steps")
    return statistics.median(steps)


def probe_engine(store_path: Path, probe_layers: int = 2, tokens: int = 3, prompt: list[int] | None = None,
                 mixed=None) -> dict:
    """The engine's per-token costs on this machine for the store's model (warm page cache)."""
    harness()
    from bench.harness.systems_local import build_cache, store_fetch
    from m2cache.model.loader import load_model
    from m2cache.model.providers import FullProvider
    from m2cache.store.reader import NeuronStore
    from m2cache.worker.provider import CachedProvider

    store = NeuronStore(store_path)
    try:
        m = store.manifest
        layout = m.layout
        model, _tok, bank = load_model(store)
        prompt = prompt or [1] + [(7919 * i + 13) % (model.config.vocab_size - 3) + 3 for i in range(1, 8)]
        k = max(1, min(probe_layers, m.num_layers))
        layers = frozenset(range(k))
        fetch = store_fetch(store)

        def cached(prec: Precision | None, fraction: float):
            ratios = {(prec or Precision.FULL).name.lower(): 1.0}
            cache = build_cache(m, fraction, ratios, 1)
            provider = CachedProvider(cache, layout, fetch, m.num_layers)
            choose = _choose_on(layers, prec, m.d_ffn)
            return provider, (lambda: provider.begin_step([choose]))

        def timed(prec: Precision | None, fraction: float) -> float:
            provider, before = cached(prec, fraction)
            try:
                return _step_seconds(model, prompt, provider, tokens, before)
            finally:
                provider.close()

        empty, before_empty = cached(None, 1.0)
        out = {"probe_layers": k, "tokens": tokens, "load_avg_start": os.getloadavg()}
        out["empty_s"] = _step_seconds(model, prompt, empty, tokens, before_empty)
        full = _Restricted(FullProvider(bank), empty, layers)
        out["resident_s"] = _step_seconds(model, prompt, full, tokens, before_empty)
        out["resident_bytes"] = k * m.d_ffn * layout.nvec * m.d_model * 4
        for prec in Precision:
            name = prec.name.lower()
            out[f"hit_{name}_s"] = timed(prec, 1.0)
            out[f"{name}_bytes"] = k * m.d_ffn * layout.num_bytes(prec)
        out["miss_full_s"] = timed(Precision.FULL, 1e-9)
        if mixed is not None:
            out["choose_s_per_layer"] = _choose_seconds(mixed.choose(), m.num_layers, m.d_model)
        empty.close()
        out["load_avg_end"] = os.getloadavg()
        return out
    finally:
        store.close()


def _choose_seconds(choose, num_layers: int, d_model: int, reps: int = 3) -> float:
    """Seconds one layer's neuron choice takes (the mixed policy's ranking)."""
    x = torch.randn(1, 1, d_model)
    choose(0, x)  # warm
    t0 = time.perf_counter()
    for r in range(reps):
        for layer in range(num_layers):
            choose(layer, x)
    return (time.perf_counter() - t0) / (reps * num_layers)


def engine_from_probe(p: dict, num_layers: int, dense_fp32_bytes: float) -> dict:
    """Engine coefficients from a probe: the compute rate (float32 weights resident),
    the fixed cost per layer, and seconds per record byte by path."""
    gemv_bw = p["resident_bytes"] / max(p["resident_s"] - p["empty_s"], 1e-9)
    per_layer = max(p["empty_s"] - dense_fp32_bytes / gemv_bw, 0.0) / num_layers
    per_byte = {f"record_{n}": max(p[f"hit_{n}_s"] - p["empty_s"], 0.0) / p[f"{n}_bytes"] for n in ("full", "int8", "int4")}
    per_byte["miss"] = max(p["miss_full_s"] - p["hit_full_s"], 0.0) / p["full_bytes"]
    return {"hbm_bandwidth": gemv_bw, "per_layer_s": per_layer, "per_byte_s": per_byte,
            "choose_s_per_layer": p.get("choose_s_per_layer", 0.0)}
