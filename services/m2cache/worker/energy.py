"""Live energy, carbon and cost accounting of a worker.

A meter gives cumulative joules: RAPL (``/sys/class/powercap``, CPU package
zones, wrap-around handled) or NVML (GPU total energy) when present, else the
hardware profile's power model (device active power while decoding, idle power
otherwise, plus host and tiers: m2cache/planner/power.py), labelled "modelled".

A sampler thread reads the meter and the engine's token counter a few times a
second; a request's energy is the energy of its lifetime shared by the tokens
the worker produced meanwhile (so a batch splits it), and carbon and cost follow
from the profile (planner/power.py). ``request_fields`` fills GenerationStats;
``metrics`` feeds the worker's /metrics.
"""
from __future__ import annotations

import bisect
import logging
import re
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from m2cache.planner import power, profiles

log = logging.getLogger(__name__)
POWERCAP = Path("/sys/class/powercap")
_ZONE = re.compile(r"^[a-z]+-rapl:\d+$")  # top-level package zones (sub-zones have a second ":")
SAMPLE_PERIOD_S = 0.25
HISTORY = 4096  # samples kept (~17 min at 4 Hz): requests older than that are attributed from the oldest


class RaplMeter:
    """Sum of the RAPL package zones' energy counters, in joules since the meter opened."""

    source = "rapl"

    def __init__(self, root: Path = POWERCAP):
        self.zones = [z for z in sorted(Path(root).glob("*")) if _ZONE.match(z.name) and (z / "energy_uj").is_file()]
        if not self.zones:
            raise FileNotFoundError(f"no readable RAPL package zones under {root}")
        self._range = [int((z / "max_energy_range_uj").read_text()) if (z / "max_energy_range_uj").is_file() else 2**32
                       for z in self.zones]
        self._last = [self._raw(z) for z in self.zones]
        self._total_uj = 0

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read_j(self) -> float:
        for i, zone in enumerate(self.zones):
            now = self._raw(zone)
            delta = now - self._last[i]
            self._total_uj += delta if delta >= 0 else delta + self._range[i]  # the counter wrapped
            self._last[i] = now
        return self._total_uj / 1e6


class NvmlMeter:
    """Total energy of every visible GPU (NVML, millijoules), joules since the meter opened."""

    source = "nvml"

    def __init__(self):
        import pynvml  # optional: nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if not self._handles:
            raise RuntimeError("NVML sees no GPU")
        self._start = self._mj()

    def _mj(self) -> int:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles)

    def read_j(self) -> float:
        return (self._mj() - self._start) / 1e3


class ModelledMeter:
    """The profile's power model integrated over time: serving power while ``busy()``,
    idle power otherwise (each interval takes the state seen at its end)."""

    source = "modelled"

    def __init__(self, profile: profiles.HardwareProfile, busy: Callable[[], bool]):
        self.active_w = power.serving_power_w(profile)
        self.idle_w = power.idle_power_w(profile)
        self.busy = busy
        self._t = time.monotonic()
        self._j = 0.0

    def read_j(self) -> float:
        now = time.monotonic()
        self._j += (self.active_w if self.busy() else self.idle_w) * (now - self._t)
        self._t = now
        return self._j


def open_meter(profile: profiles.HardwareProfile, busy: Callable[[], bool], powercap: Path = POWERCAP,
               nvml: bool = True):
    """RAPL, else NVML (unless ``nvml`` is false), else the profile's model."""
    makers = [lambda: RaplMeter(powercap)] + ([NvmlMeter] if nvml else [])
    for make in makers:
        try:
            return make()
        except Exception as err:  # absent or unreadable: try the next source
            log.debug("energy meter unavailable: %s", err)
    return ModelledMeter(profile, busy)


class EnergyAccountant:
    """Samples ``meter`` with the engine's token counter; attributes energy to requests."""

    def __init__(self, meter, tokens: Callable[[], int], busy: Callable[[], bool], profile: profiles.HardwareProfile,
                 tariff: power.Tariff = power.Tariff(), period_s: float = SAMPLE_PERIOD_S):
        self.meter, self.tokens, self.busy = meter, tokens, busy
        self.profile, self.tariff = profile, tariff
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, float, int]] = deque(maxlen=HISTORY)  # (monotonic t, J, tokens)
        self.busy_j = 0.0  # energy of intervals in which the worker was decoding
        self.busy_s = 0.0  # and their length
        self.sample()
        self._stop = threading.Event()
        ref = weakref.ref(self)
        threading.Thread(target=_sample_loop, args=(ref, self._stop, period_s), name="energy-sampler",
                         daemon=True).start()

    @property
    def source(self) -> str:
        return self.meter.source

    def sample(self) -> tuple[float, float, int]:
        with self._lock:
            t, j, n = time.monotonic(), self.meter.read_j(), self.tokens()
            if self._samples:
                t0, j0, n0 = self._samples[-1]
                if n > n0 or self.busy():
                    self.busy_j += j - j0
                    self.busy_s += t - t0
            self._samples.append((t, j, n))
            return t, j, n

    def close(self) -> None:
        self._stop.set()

    def _at(self, t: float) -> tuple[float, float]:
        """(joules, tokens) at monotonic time ``t``, interpolated between samples."""
        samples = list(self._samples)
        times = [s[0] for s in samples]
        i = bisect.bisect_left(times, t)
        if i == 0:
            return samples[0][1], samples[0][2]
        if i >= len(samples):
            return samples[-1][1], samples[-1][2]
        (ta, ja, na), (tb, jb, nb) = samples[i - 1], samples[i]
        w = (t - ta) / (tb - ta) if tb > ta else 1.0
        return ja + w * (jb - ja), na + w * (nb - na)

    def request(self, start: float, num_tokens: int) -> tuple[float, float]:
        """(joules, seconds of the box) of a request that began at monotonic ``start``
        and produced ``num_tokens``: its lifetime's energy and time shared by the
        tokens produced meanwhile."""
        t_end, j_end, n_end = self.sample()
        with self._lock:
            j_start, n_start = self._at(start)
        produced = n_end - n_start
        share = min(1.0, num_tokens / produced) if produced > 0 else 1.0
        return max(j_end - j_start, 0.0) * share, max(t_end - start, 0.0) * share

    def request_fields(self, seq) -> dict:
        """GenerationStats fields of a finished sequence: energy_j, energy_source, gco2, cost_usd."""
        joules, seconds = self.request(seq.submitted, len(seq.generated))
        return {"energy_j": joules, "energy_source": self.source,
                "gco2": power.carbon_g(self.profile, joules, seconds, self.tariff),
                "cost_usd": power.cost_usd(self.profile, joules, seconds, self.tariff)}

    def metrics(self):
        """Prometheus families: energy, energy per token, carbon and cost per token."""
        _t, total_j, tokens = self.sample()
        labels = ["source", "profile"]
        values = [self.source, self.profile.name]
        per_token = self.busy_j / tokens if tokens else 0.0
        seconds = self.busy_s / tokens if tokens else 0.0
        fams = [
            (CounterMetricFamily, "m2cache_worker_energy_joules", "energy since the worker started", total_j),
            (CounterMetricFamily, "m2cache_worker_decode_energy_joules", "energy while decoding", self.busy_j),
            (GaugeMetricFamily, "m2cache_worker_energy_per_token_joules", "decode energy per generated token",
             per_token),
            (GaugeMetricFamily, "m2cache_worker_gco2_per_token", "gCO2 per generated token (grid + embodied)",
             power.carbon_g(self.profile, per_token, seconds, self.tariff) if tokens else 0.0),
            (GaugeMetricFamily, "m2cache_worker_cost_usd_per_token", "cost per generated token (USD)",
             power.cost_usd(self.profile, per_token, seconds, self.tariff) if tokens else 0.0),
        ]
        for kind, name, doc, value in fams:
            fam = kind(name, doc, labels=labels)
            fam.add_metric(values, value)
            yield fam


def _sample_loop(ref, stop: threading.Event, period_s: float) -> None:
    """Sample until stopped or until the accountant is garbage (its worker is gone)."""
    while not stop.wait(period_s):
        acc = ref()
        if acc is None:
            return
        try:
            acc.sample()
        except Exception:  # a flaky counter must not kill the worker
            log.exception("energy sample failed")
        del acc


def for_engine(engine, hardware: str = "cpu-server", grid_gco2_per_kwh: float = power.DEFAULT_GRID_GCO2_PER_KWH,
               powercap: Path = POWERCAP) -> EnergyAccountant:
    """The accountant of a worker's engine (its ``tokens`` and ``num_active`` counters)."""
    profile = profiles.load(hardware or "cpu-server")
    busy = lambda: engine.num_active > 0
    return EnergyAccountant(open_meter(profile, busy, powercap), lambda: engine.tokens, busy, profile,
                            power.Tariff(grid_gco2_per_kwh=grid_gco2_per_kwh))
