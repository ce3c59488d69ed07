"""A profile of this machine, measured by the tool itself.

Two kinds of figures, both taken on the store being planned for:
- tier bandwidths from the benchmark's own probes (bench/harness/bandwidth.py:
  the store's cold record reads, the block device, Redis MGET, memory), plus the
  same cold record read over whole layers (contiguous runs) and the random one
  again from the page cache (warm): ``probe_tiers``;
- the engine's per-token overhead: planner/probes.py.
``local_profile`` turns them into a HardwareProfile; ``calibrate`` times a fixed
reference workload (how fast the shared machine is right now).

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


def probe_tiers(store_path: Path) -> dict:
    """The benchmark's tier bandwidths (bench/harness/bandwidth.py) plus the store's
    cold record reads over whole layers (contiguous runs)."""
    harness()
    from bench.harness import bandwidth

    out = bandwidth.measure_all(store_path)
    out["ssd_records_contiguous"] = bandwidth.ssd_records(store_path, layers=(1, 2), fraction=1.0)
    out["ssd_records_warm"] = bandwidth.ssd_records(store_path, warm=True)  # the same reads from the page cache
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
        "engine": {"per_token_s": 0.0, "per_layer_s": engine["per_layer_s"],
                   "per_byte_s": {**engine["per_byte_s"], **_warm_read(tiers)},
                   "per_layer_choose_s": engine.get("choose_s_per_layer", 0.0),
                   "overlap": OVERLAP, "source": f"measured {when}"},
        "tiers": [
            {"name": "memory", "kind": "hbm", "capacity_gb": mem / gb, "bandwidth_gbs": engine["hbm_bandwidth"] / gb,
             "power_w_per_gb": 0.1016, "source": engine.get("hbm_source", "engine probe")},
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


def _warm_read(tiers: dict) -> dict:
    """s/B of the store's record reads from the page cache: part of what the engine's miss
    probe (a warm store) measures, and what a cold read replaces (roofline.miss_s_per_byte)."""
    warm = tiers.get("ssd_records_warm", {}).get("bytes_per_s")
    return {"warm_read": 1.0 / warm} if warm else {}


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


class Speedometer:
    """``calibrate`` sampled at a low duty cycle (one 1-rep sample every ``period_s``) on a
    thread while something else runs, so the machine's speed is known *during* it: on a
    shared box the load changes within a run. Use as a context manager; ``seconds`` is
    the median sample (the reference workload's time), None if none was taken."""

    def __init__(self, period_s: float = 1.5):  # a sample is ~25 ms: a few percent of one core
        import threading

        self.period_s = period_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="speedometer", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(calibrate(reps=1))

    def __enter__(self) -> "Speedometer":
        self.samples.append(calibrate(reps=3))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(calibrate(reps=3))

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

