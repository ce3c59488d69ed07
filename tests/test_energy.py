"""The worker's live energy accounting: RAPL counters (wrap-around), the modelled
meter, attribution of a batch's energy to its requests, and a real worker on
loopback whose /metrics and GenerationStats carry energy per token with its source."""
from __future__ import annotations

import re
import time
import urllib.request

import pytest

from m2cache.metrics import start_metrics_server
from m2cache.planner import power, profiles
from m2cache.worker import energy
from m2cache.worker.metrics import worker_registry
from tiers import free_port
from worker_stack import WorkerHandle

PROMPT = [1, 365, 118, 263, 431]


def _zone(root, name, uj, max_uj=None):
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(f"{uj}\n")
    if max_uj is not None:
        (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_sums_package_zones_and_survives_wraparound(tmp_path):
    pkg0 = _zone(tmp_path, "intel-rapl:0", 1_000_000, max_uj=10_000_000)
    pkg1 = _zone(tmp_path, "intel-rapl:1", 5_000_000, max_uj=10_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 123)  # a sub-zone (cores): inside package 0, never added again
    meter = energy.RaplMeter(tmp_path)
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]
    (pkg0 / "energy_uj").write_text("3000000\n")  # +2 J
    (pkg1 / "energy_uj").write_text("500000\n")  # wrapped: +5.5 J
    assert meter.read_j() == pytest.approx(7.5)
    (pkg0 / "energy_uj").write_text("3500000\n")
    assert meter.read_j() == pytest.approx(8.0)


def test_no_rapl_zones_means_the_modelled_meter(tmp_path):
    profile = profiles.load("cpu-server")
    meter = energy.open_meter(profile, lambda: True, powercap=tmp_path, nvml=False)
    assert meter.source == "modelled"
    t0 = meter.read_j()
    time.sleep(0.2)
    watts = (meter.read_j() - t0) / 0.2
    assert watts == pytest.approx(power.serving_power_w(profile), rel=0.3)


class _Counter:
    """A stand-in engine: tokens advance while busy."""

    def __init__(self):
        self.tokens, self.num_active = 0, 0


def test_a_batch_splits_its_energy_by_tokens(tmp_path):
    engine = _Counter()
    profile = profiles.load("rtx3090")
    busy = lambda: engine.num_active > 0
    acc = energy.EnergyAccountant(energy.ModelledMeter(profile, busy), lambda: engine.tokens, busy, profile,
                                  period_s=0.02)
    try:
        start = time.monotonic()
        engine.num_active = 2
        for _ in range(10):  # two requests decoding together: 10 steps x 2 tokens
            time.sleep(0.02)
            engine.tokens += 2
        joules, seconds = acc.request(start, 10)
        elapsed = time.monotonic() - start
        assert seconds == pytest.approx(elapsed / 2, rel=0.2)  # half the box's time...
        assert joules == pytest.approx(power.serving_power_w(profile) * elapsed / 2, rel=0.2)  # ...and its energy
        fams = {f.name: f for f in acc.metrics()}
        per_token = fams["m2cache_worker_energy_per_token_joules"].samples[0]
        assert per_token.labels == {"source": "modelled", "profile": "rtx3090"} and per_token.value > 0
    finally:
        acc.close()


def _metric(text: str, name: str) -> tuple[dict, float]:
    match = re.search(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
    return labels, float(match.group(2))


def test_worker_metrics_and_stats_carry_energy_per_token(make_dram):
    dram = make_dram(budget_bytes=1 << 20, num_pinned_layers=1, preload_ahead=1)
    worker = WorkerHandle(dram.target, "stories260k", cache_fraction=1.0, hardware="rtx3090")
    port = free_port()
    server, _thread = start_metrics_server(port, worker_registry(worker.runtime))
    try:
        ids, stats = worker.generate(PROMPT, 16)
        assert len(ids) > 1
        assert stats.energy_j > 0 and stats.gco2 > 0 and stats.cost_usd > 0
        assert stats.energy_source in ("rapl", "nvml", "modelled")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        labels, per_token = _metric(text, "m2cache_worker_energy_per_token_joules")
        assert per_token > 0 and labels["source"] == stats.energy_source and labels["profile"] == "rtx3090"
        _labels, total = _metric(text, "m2cache_worker_energy_joules_total")
        assert total >= per_token
        _labels, gco2 = _metric(text, "m2cache_worker_gco2_per_token")
        assert gco2 > 0
        if stats.energy_source == "modelled":  # the profile's power for the request's share of the box's time
            assert stats.energy_j <= power.serving_power_w(profiles.load("rtx3090")) * 60
    finally:
        server.shutdown()
        worker.stop()
