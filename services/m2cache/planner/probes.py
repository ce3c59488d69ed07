"""Engine probes: the per-token costs of this machine's engine, measured on a store's
own model through the benchmark's systems (bench/harness/systems_local.py), with the
FFN restricted to a few probe layers, so each figure is a difference of two measured
step times: no neurons at all (the fixed per-layer and per-token cost), the FFN
resident as float32 (the compute rate), records at each precision through the
worker's cache as hits and as misses from a warm local store, whole layers streamed
as naive streaming does, and the mixed policy's own choice. None of these is a
configuration the benchmark runs. The service stack needs no probe of its own: its
worker reads the store's records file itself (short-circuit reads), as in-process
does. ``probe_in_child`` runs them in a fresh process under the benchmark's own
isolation (page cache dropped and capped by a cgroup memory limit).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from m2cache.codec.format import DTYPES, Precision
from m2cache.planner.measure import REPO, harness

log = logging.getLogger(__name__)
VARIANTS = ("resident", "full", "int8", "int4", "miss", "stream", "mixed")
NO_CACHE = 1e-9  # a cache budget fraction that leaves no slot


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


def _step_times(model, prompt: list[int], ffn, tokens: int, before_step=lambda: None) -> list[float]:
    """Seconds of each decode step (prefill and one warm-up token excluded)."""
    from bench.harness.systems_local import greedy_loop

    stamps: list[float] = []
    greedy_loop(model, prompt, 2 + tokens, ffn, lambda i, t: stamps.append(time.perf_counter()), before_step)
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    if not steps:
        raise RuntimeError("the probe model stopped at EOS before the measured steps")
    return steps


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
                 prompt: list[int] | None = None, mixed=None, before=lambda: None, rounds: int = 3) -> dict:
    """The engine's per-token costs on this machine for the store's model.

    ``variants``: which steps to time besides the empty one: "resident" (FullProvider),
    "full"/"int8"/"int4" (every neuron of the probe layers at that precision, cache hits),
    "miss" (FULL records with no cache: read from the store every step), "stream" (whole
    layers read and decoded every step, as naive streaming does), "mixed" (with ``mixed``,
    the benchmark's policy object: its own choice on the probe layers, fixed after the
    first step, as hits and as misses), ``tokens`` steps each in each of ``rounds``
    rounds, the median of all. Every provider is built (its cache allocated)
    before ``before()`` runs, so an isolation it sets up (a cgroup limit over the memory
    in use) applies to the timed steps only."""
    harness()
    from m2cache.local.loader import load_model
    from m2cache.store.reader import NeuronStore

    store = NeuronStore(store_path)
    try:
        model, _tok, bank = load_model(store)
        prompt = prompt or [1] + [(7919 * i + 13) % (model.config.vocab_size - 3) + 3 for i in range(1, 8)]
        k = max(1, min(probe_layers, store.manifest.num_layers))
        steps, sizes, closers = _build_steps(store, store_path, bank, frozenset(range(k)), variants, mixed)
        before()
        out = {"probe_layers": k, "tokens": tokens, "num_layers": store.manifest.num_layers,
               "load_avg_start": os.getloadavg(), **sizes}
        t0 = time.perf_counter()
        times: dict[str, list[float]] = {key: [] for key, _, _ in steps}
        try:
            # rounds over every variant, not one block each: a figure is a difference of two medians,
            # and a slow spell of this shared machine then lands on all of them, not on one
            for _ in range(rounds):
                for key, ffn, before_step in steps:
                    times[key] += _step_times(model, prompt, ffn, tokens, before_step)
            out.update({key: statistics.median(t) for key, t in times.items()})
        finally:
            for close in closers:
                close()
        if mixed is not None and "mixed" in variants:
            out["choose_s_per_layer"] = _choose_seconds(mixed.choose(), store.manifest.num_layers,
                                                        store.manifest.d_model)
        out["wall_s"] = time.perf_counter() - t0
        out["load_avg_end"] = os.getloadavg()
        return out
    finally:
        store.close()


def _build_steps(store, store_path: Path, bank, layers: frozenset[int], variants, mixed):
    """[(result key, FFN callable, before_step)], byte sizes, closers: every probe's provider."""
    from bench.harness.systems_local import NaiveStreaming
    from m2cache.local.loader import store_fetch
    from m2cache.model.providers import FullProvider
    from m2cache.worker.runtime import build_cache
    from m2cache.worker.provider import CachedProvider

    m, layout = store.manifest, store.manifest.layout
    fetch = store_fetch(store)
    closers = []

    def cached(key: str, fraction: float, choose, ratios: dict):
        provider = CachedProvider(build_cache(m, fraction, ratios, 1), layout, fetch, m.num_layers)
        closers.append(provider.close)
        return key, provider, (lambda: provider.begin_step([choose]))

    def empty():
        return cached("", NO_CACHE, _choose_on(layers, None, m.d_ffn), {"full": 1.0})[1:]

    steps = [cached("empty_s", NO_CACHE, _choose_on(layers, None, m.d_ffn), {"full": 1.0})]
    sizes = {f"{p.name.lower()}_bytes": len(layers) * m.d_ffn * layout.num_bytes(p) for p in Precision}
    if "resident" in variants:  # float32 GEMVs are quick: more layers for a steadier difference
        wide = frozenset(range(max(len(layers), m.num_layers // 4)))
        for layer in wide:  # decoded now, as DenseReference does before its clock starts
            bank.vectors(layer, Precision.FULL)
        rest, before_rest = empty()
        steps.append(("resident_s", _Restricted(FullProvider(bank), rest, wide), before_rest))
        sizes["resident_bytes"] = len(wide) * m.d_ffn * layout.nvec * m.d_model * bank.dtype.itemsize
    for prec in Precision:
        name = prec.name.lower()
        if name in variants:
            steps.append(cached(f"hit_{name}_s", 1.0, _choose_on(layers, prec, m.d_ffn), {name: 1.0}))
    if "miss" in variants:
        steps.append(cached("miss_full_s", NO_CACHE, _choose_on(layers, Precision.FULL, m.d_ffn), {"full": 1.0}))
    if "stream" in variants:  # the benchmark's naive streaming, on the probe layers
        naive = NaiveStreaming(store_path)
        closers.append(naive.close)
        rest, before_rest = empty()
        steps.append(("stream_s", _Restricted(naive, rest, layers), before_rest))
    if mixed is not None and "mixed" in variants:
        ratios = mixed.ratios.to_dict()
        steps.append(cached("mixed_s", 1.0, _memo_choose(mixed.choose(), layers), ratios))
        steps.append(cached("mixed_miss_s", NO_CACHE, _memo_choose(mixed.choose(), layers), ratios))
        counts = mixed.ratios.counts(m.d_ffn)
        sizes["mixed_bytes"] = len(layers) * sum(n * layout.num_bytes(p) for p, n in zip(Precision, counts))
    return steps, sizes, closers


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
    """Engine figures from a probe: the compute rate (``memory_bandwidth``, the benchmark's
    memory probe, bytes/s; else the resident FFN's probe step), the fixed cost per layer
    (what an empty step leaves after the dense weights' GEMVs), and seconds per record
    byte by path."""
    out: dict = {"per_byte_s": {}, "choose_s_per_layer": p.get("choose_s_per_layer", 0.0)}
    step = lambda key: max(p[key] - p["empty_s"], 1e-9)
    if memory_bandwidth:  # a steady figure (best of five passes); the dense path's GEMVs stream at it
        out["hbm_bandwidth"], out["hbm_source"] = memory_bandwidth, "memory read bandwidth (bench probe)"
    elif "resident_s" in p:  # a difference of two medians of a few steps: noisier
        out["hbm_bandwidth"] = p["resident_bytes"] / step("resident_s")
        out["hbm_source"] = "resident FFN weights through the model's matmuls (engine probe)"
    else:
        raise ValueError("no compute rate: give the memory bandwidth or probe 'resident'")
    out["dense_s"] = shape.decode_dense_params * DTYPES[shape.dtype].itemsize / out["hbm_bandwidth"]
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


def probe_in_child(store_path: Path, variants, work: Path, headroom_bytes: int | None = None,
                   probe_layers: int = 2, tokens: int = 5, prompt: list[int] | None = None, ratios=None,
                   timeout_s: float = 1800.0) -> dict:
    """``probe_engine`` in its own process, as the benchmark runs a configuration: with the
    page cache dropped and, given ``headroom_bytes``, under the same cgroup memory limit
    (anonymous memory + headroom) when the machine allows one."""
    import json
    import subprocess

    harness()
    work.mkdir(parents=True, exist_ok=True)
    spec = {"store": str(store_path), "variants": list(variants), "headroom_bytes": headroom_bytes,
            "probe_layers": probe_layers, "tokens": tokens, "prompt": prompt, "ratios": ratios}
    spec_path, out_path = work / "probe.spec.json", work / "probe.result.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), str(REPO),
                                                        os.environ.get("PYTHONPATH", "")])}
    with open(work / "probe.log", "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "m2cache.planner.probes", str(spec_path), str(out_path)],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        finally:
            _remove_group(_group_name(proc.pid))  # left behind when the child was killed (OOM, timeout)
    if code != 0 or not out_path.is_file():
        raise RuntimeError(f"engine probe failed (exit {code}; log {work / 'probe.log'})")
    return json.loads(out_path.read_text())


def _group_name(pid: int) -> str:
    return f"m2c-plan-probe-{pid}"


def _remove_group(name: str) -> None:
    from bench.harness import honest

    parent = honest._own_memory_group() if honest.MemoryLimit.available() else None
    if parent is not None and (parent / name).is_dir():
        try:
            (parent / name).rmdir()
        except OSError as err:
            log.warning("could not remove cgroup %s: %s", parent / name, err)


def _child(spec_path: str, out_path: str) -> None:
    import json

    harness()
    from bench.harness import honest

    spec = json.loads(Path(spec_path).read_text())
    group = None
    if spec.get("headroom_bytes") and honest.MemoryLimit.available():
        group = honest.MemoryLimit(_group_name(os.getpid()))
        group.add(os.getpid())
    mixed = None
    if spec.get("ratios"):
        from bench.harness.configs import _manifest
        from bench.harness.policy import load_mixed_policy
        from m2cache.predictors.bands import BandRatios

        mixed = load_mixed_policy(Path(spec["store"]), _manifest(Path(spec["store"])), BandRatios(*spec["ratios"]))
    try:
        def isolate():
            honest.drop_caches([Path(spec["store"]) / "data.mdb"])
            if group is not None:
                honest.cap_page_cache(group, [os.getpid()], spec["headroom_bytes"])

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
