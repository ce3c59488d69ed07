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
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from m2cache.codec.format import Precision
from m2cache.errors import FailedPrecondition
from m2cache.planner import profiles
from m2cache.planner.profiles import HardwareProfile

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]
# Today's engine does not hide tier reads behind compute on this box: its prefetch
# thread and the compute share two busy cores and the GIL (docs/PLANNING.md).
OVERLAP = False


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


VARIANTS = ("resident", "full", "int8", "int4", "miss", "stream", "mixed")


def _memo_choose(choose, layers: frozenset[int]):
    """``choose`` on ``layers`` with each layer's first answer repeated (a fixed mixed
    choice: every later step hits the cache), nothing elsewhere."""
    first: dict[int, dict] = {}

    def fixed(layer: int, x: torch.Tensor) -> dict:
        if layer not in layers:
            return {}
        if layer not in first:
            first[layer] = choose(layer, x)
        return first[layer]

    return fixed


def probe_engine(store_path: Path, variants=VARIANTS, probe_layers: int = 2, tokens: int = 5,
                 prompt: list[int] | None = None, mixed=None, before=lambda: None) -> dict:
    """The engine's per-token costs on this machine for the store's model (warm page cache).

    ``variants``: which steps to time besides the empty one: "resident" (FullProvider),
    "full"/"int8"/"int4" (every neuron of the probe layers at that precision, cache hits),
    "miss" (FULL records with no cache: read from the warm store every step), "stream"
    (whole layers read and decoded every step, as naive streaming does); with
    ``mixed`` (the benchmark's policy object) and "mixed", the policy's own choice on the
    probe layers, as hits ("mixed") and as misses ("mixed_miss"). ``before()`` runs once the
    model is loaded, before the first timed step (the child uses it to drop the page cache and
    cap it as the benchmark's configurations are)."""
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

        def cached(prec: Precision | None, fraction: float, choose=None, ratios=None):
            ratios = ratios or {(prec or Precision.FULL).name.lower(): 1.0}
            provider = CachedProvider(build_cache(m, fraction, ratios, 1), layout, fetch, m.num_layers)
            choose = choose or _choose_on(layers, prec, m.d_ffn)
            return provider, (lambda: provider.begin_step([choose]))

        def timed(prec: Precision | None, fraction: float, choose=None, ratios=None) -> float:
            provider, before = cached(prec, fraction, choose, ratios)
            try:
                return _step_seconds(model, prompt, provider, tokens, before)
            finally:
                provider.close()

        if "resident" in variants:  # decode the resident layers before isolation, as DenseReference does
            for layer in range(max(k, m.num_layers // 4)):
                bank.vectors(layer, Precision.FULL)
        naive = None
        if "stream" in variants:  # the benchmark's naive streaming (its own model: loaded before isolation)
            from bench.harness.systems_local import NaiveStreaming

            naive = NaiveStreaming(store_path)
        before()
        out = {"probe_layers": k, "tokens": tokens, "num_layers": m.num_layers, "load_avg_start": os.getloadavg()}
        t0 = time.perf_counter()
        out["empty_s"] = timed(None, 1.0)
        if "resident" in variants:  # float32 GEMVs are quick: more layers for a steadier difference
            wide = frozenset(range(max(k, m.num_layers // 4)))
            empty, before_empty = cached(None, 1.0)
            full = _Restricted(FullProvider(bank), empty, wide)
            out["resident_s"] = _step_seconds(model, prompt, full, tokens, before_empty)
            out["resident_bytes"] = len(wide) * m.d_ffn * layout.nvec * m.d_model * 4
            empty.close()
        for prec in Precision:
            name = prec.name.lower()
            out[f"{name}_bytes"] = k * m.d_ffn * layout.num_bytes(prec)
            if name in variants:
                out[f"hit_{name}_s"] = timed(prec, 1.0)
        if "miss" in variants:
            out["miss_full_s"] = timed(Precision.FULL, 1e-9)
        if naive is not None:  # whole layers read and decoded every step
            empty, before_empty = cached(None, 1.0)
            try:
                out["stream_s"] = _step_seconds(model, prompt, _Restricted(naive, empty, layers), tokens, before_empty)
            finally:
                naive.close()
                empty.close()
        if mixed is not None and "mixed" in variants:
            ratios = mixed.ratios.to_dict()
            probe_choose = _memo_choose(mixed.choose(), layers)
            out["mixed_s"] = timed(None, 1.0, probe_choose, ratios)
            out["mixed_miss_s"] = timed(None, 1e-9, _memo_choose(mixed.choose(), layers), ratios)
            out["mixed_bytes"] = k * sum(n * layout.num_bytes(p) for p, n in zip(Precision, mixed.ratios.counts(m.d_ffn)))
            out["choose_s_per_layer"] = _choose_seconds(mixed.choose(), m.num_layers, m.d_model)
        out["wall_s"] = time.perf_counter() - t0
        out["load_avg_end"] = os.getloadavg()
        return out
    finally:
        store.close()


def _choose_seconds(choose, num_layers: int, d_model: int, reps: int = 3) -> float:
    """Seconds one layer's neuron choice takes (the mixed policy's ranking)."""
    x = torch.randn(1, 1, d_model)
    choose(0, x)  # warm
    t0 = time.perf_counter()
    for _ in range(reps):
        for layer in range(num_layers):
            choose(layer, x)
    return (time.perf_counter() - t0) / (reps * num_layers)


def engine_coefficients(p: dict, shape, memory_bandwidth: float | None = None) -> dict:
    """Engine figures from a probe: the compute rate (float32 weights resident, bytes/s;
    else ``memory_bandwidth``, the benchmark's memory probe), the fixed cost per layer
    (what an empty step leaves after the dense weights' GEMVs), and seconds per record
    byte by path."""
    out: dict = {"per_byte_s": {}, "choose_s_per_layer": p.get("choose_s_per_layer", 0.0)}
    step = lambda key: max(p[key] - p["empty_s"], 1e-9)
    if "resident_s" in p:
        out["hbm_bandwidth"] = p["resident_bytes"] / step("resident_s")
    elif memory_bandwidth:
        out["hbm_bandwidth"] = memory_bandwidth
    else:
        raise ValueError("no compute rate: probe 'resident' or give the memory bandwidth")
    out["dense_s"] = shape.decode_dense_params * 4 / out["hbm_bandwidth"]
    out["per_layer_s"] = max(p["empty_s"] - out["dense_s"], 0.0) / p["num_layers"]
    out["empty_s"] = p["empty_s"]
    for name in ("full", "int8", "int4"):
        if f"hit_{name}_s" in p:
            out["per_byte_s"][f"record_{name}"] = step(f"hit_{name}_s") / p[f"{name}_bytes"]
    if "stream_s" in p:
        out["per_byte_s"]["record_stream"] = step("stream_s") / p["full_bytes"]
    if "miss_full_s" in p and "hit_full_s" in p:
        out["per_byte_s"]["miss"] = max(p["miss_full_s"] - p["hit_full_s"], 0.0) / p["full_bytes"]
    if "mixed_s" in p:  # the policy's own mix (scattered ids, three precisions): replaces the per-precision figures
        out["per_byte_s"]["record_mixed"] = step("mixed_s") / p["mixed_bytes"]
        out["per_byte_s"]["miss_mixed"] = max(p["mixed_miss_s"] - p["mixed_s"], 0.0) / p["mixed_bytes"]
    return out


def probe_stack(store_path: Path, log_dir: Path, fraction: float = 0.25) -> dict:
    """Seconds per record byte through the service stack (bench/harness/systems_stack.py's
    ServiceStack: NeuronStore + DramTier + Redis processes), as the worker's fetch sees
    them: a quarter of the last layer read through from the cold store, then again from Redis."""
    harness()
    import numpy as np

    from bench.harness.honest import drop_caches
    from bench.harness.systems_stack import ServiceStack
    from m2cache import grpc_util
    from m2cache.store.reader import NeuronStore
    from m2cache.worker.fetcher import TierFetcher

    store_path = Path(store_path).resolve()
    store = NeuronStore(store_path)
    m = store.manifest
    store.close()
    rb = m.layout.num_bytes(Precision.FULL)
    layer = m.num_layers - 1
    ids = torch.from_numpy(np.sort(np.random.default_rng(0).choice(m.d_ffn, max(1, int(fraction * m.d_ffn)),
                                                                    replace=False)))
    stack = ServiceStack(store_path.parent, m.num_layers * m.d_ffn * rb, "full", log_dir, None)
    try:
        fetcher = TierFetcher(grpc_util.channel(stack.dram_target), store_path.name, "probe", deadline_s=600.0)
        fetcher.manifest()
        spare = torch.tensor([int(np.setdiff1d(np.arange(m.d_ffn), ids.numpy())[0])])
        fetcher.neurons(layer, Precision.FULL, spare, layer)  # first-call costs (store handle, crc table) off the clock
        drop_caches([store_path / "data.mdb"])
        t0 = time.perf_counter()
        fetcher.neurons(layer, Precision.FULL, ids, layer)  # read through from the store
        t1 = time.perf_counter()
        fetcher.neurons(layer, Precision.FULL, ids, layer)  # admitted on the way: Redis hits now
        t2 = time.perf_counter()
        hits = stack.dram_stats().bytes_from_redis
        fetcher.channel.close()
    finally:
        stack.close()
    nbytes = len(ids) * rb
    return {"through_s_per_byte": (t1 - t0) / nbytes, "redis_s_per_byte": (t2 - t1) / nbytes, "bytes": nbytes,
            "second_pass_from_redis": hits / nbytes}


def probe_tiers(store_path: Path) -> dict:
    """The benchmark's tier bandwidths (bench/harness/bandwidth.py) plus the store's
    cold record reads over whole layers (contiguous runs)."""
    harness()
    from bench.harness import bandwidth

    out = bandwidth.measure_all(store_path)
    out["ssd_records_contiguous"] = bandwidth.ssd_records(store_path, layers=(1, 2), fraction=1.0)
    return out


def local_profile(engine: dict, tiers: dict, name: str = "this-machine", price_per_hour_usd: float = 0.10,
                  when: str = "") -> HardwareProfile:
    """A profile of this machine from measured figures (power: RAPL when present, else assumed)."""
    import psutil

    mem = psutil.virtual_memory().total
    disk = shutil.disk_usage(REPO).free
    cores = os.cpu_count() or 1
    gb = 1e9
    raw = {
        "name": name, "measured": True, "device": "cpu",
        "description": f"this machine: {cores} CPU cores, {mem / 2**30:.0f} GiB RAM, measured by m2cache plan {when}",
        "compute": {"flops": engine.get("flops", 2e10 * cores), "efficiency": 1.0},
        "power": {"device_active_w": engine.get("active_w", 10.0 * cores), "device_idle_w": 2.0 * cores,
                  "host_w": 10.0},
        "cost": {"price_per_hour_usd": price_per_hour_usd, "includes_energy": True,
                 "embodied_kgco2": 50.0 * cores / 64 * 20, "lifetime_years": 4},
        "engine": {"per_token_s": 0.0, "per_layer_s": engine["per_layer_s"], "per_byte_s": engine["per_byte_s"],
                   "per_layer_choose_s": engine.get("choose_s_per_layer", 0.0),
                   "overlap": OVERLAP, "source": f"measured {when}"},
        "tiers": [
            {"name": "memory", "kind": "hbm", "capacity_gb": mem / gb, "bandwidth_gbs": engine["hbm_bandwidth"] / gb,
             "power_w_per_gb": 0.1016, "source": "float32 weights through the model's matmuls (engine probe)"},
            {"name": "redis", "kind": "dram", "capacity_gb": mem / gb,
             "bandwidth_gbs": tiers["dram"]["bytes_per_s"] / gb, "source": "Redis MGET of FULL records (bench probe)"},
            {"name": "ssd", "kind": "ssd", "capacity_gb": disk / gb, "bandwidth_gbs": tiers["ssd_records"]["bytes_per_s"] / gb,
             "sequential_gbs": tiers["ssd_records_contiguous"]["bytes_per_s"] / gb, "power_w": 2,
             "source": "store record reads, cold: random 25% of a layer / whole layers (bench probe)"},
        ],
        "sources": {"power": engine.get("power_source", "assumed: ~10 W per busy core, 2 W idle (no RAPL here)"),
                    "price": "assumed: small cloud VM class", "embodied": "assumed: core share of a server"},
    }
    return profiles.from_dict(raw, name)


def calibrate(reps: int = 5) -> float:
    """Seconds of a fixed reference workload (float32 GEMVs on the torch threads plus a
    Python loop, like a decode step's mix), median of ``reps``. On a shared machine the
    CPU available changes minute to minute; the ratio of this figure next to a probe and
    next to a configuration says by how much (validate.py scales by it)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 8192, generator=g)  # 64 MiB: out of cache, like weights
    x = torch.randn(1, 2048, generator=g)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(8):
            x @ w
        acc = 0
        for i in range(20000):
            acc += i & 7
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def probe_in_child(store_path: Path, variants, work: Path, headroom_bytes: int | None = None,
                   probe_layers: int = 2, tokens: int = 5, prompt: list[int] | None = None, ratios=None,
                   timeout_s: float = 1800.0) -> dict:
    """``probe_engine`` in its own process, as the benchmark runs a configuration: with the
    page cache dropped and, given ``headroom_bytes``, under the same cgroup memory limit
    (anonymous memory + headroom) when the machine allows one."""
    import json
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    spec = {"store": str(store_path), "variants": list(variants), "headroom_bytes": headroom_bytes,
            "probe_layers": probe_layers, "tokens": tokens, "prompt": prompt, "ratios": ratios}
    spec_path, out_path = work / "probe.spec.json", work / "probe.result.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), str(REPO),
                                                        os.environ.get("PYTHONPATH", "")])}
    with open(work / "probe.log", "w") as log_file:
        proc = subprocess.run([sys.executable, "-m", "m2cache.planner.measure", str(spec_path), str(out_path)],
                              env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"engine probe failed (exit {proc.returncode}; log {work / 'probe.log'})")
    return json.loads(out_path.read_text())


def _child(spec_path: str, out_path: str) -> None:
    import json

    harness()
    from bench.harness import honest

    spec = json.loads(Path(spec_path).read_text())
    group = None
    if spec.get("headroom_bytes") and honest.MemoryLimit.available():
        group = honest.MemoryLimit(f"m2c-plan-probe-{os.getpid()}")
        group.add(os.getpid())
    mixed = None
    if spec.get("ratios"):
        from bench.harness.configs import _manifest
        from bench.harness.policy import load_mixed_policy
        from m2cache.ranker.bands import BandRatios

        mixed = load_mixed_policy(Path(spec["store"]), _manifest(Path(spec["store"])), BandRatios(*spec["ratios"]))
    try:
        def isolate():
            honest.drop_caches([Path(spec["store"]) / "data.mdb"])
            if group is not None:
                honest.cap_page_cache(group, os.getpid(), spec["headroom_bytes"])

        out = probe_engine(Path(spec["store"]), tuple(spec["variants"]), spec["probe_layers"], spec["tokens"],
                           spec.get("prompt"), mixed, before=isolate)
        out["isolation"] = "cgroup limit" if group is not None else "none"
    finally:
        if group is not None:
            group.set_limit(-1)
            group.close()
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("M2CACHE_BENCH_LOG", "WARNING"))
    _child(sys.argv[1], sys.argv[2])
