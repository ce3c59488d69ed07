"""`m2cache plan`: shipped hardware profiles, model shapes, the cache model, the
roofline, placement across HBM / DRAM / CXL / SSD, the power model, and the
command's table, JSON and plot. No timing assertions: validation against the
benchmark is `m2cache plan --validate` (tests/test_plan_validate.py runs it small)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from m2cache import cli
from m2cache.codec.format import Precision
from m2cache.planner import placement, power, profiles, roofline, shapes, traffic

REQUIRED = {"m40-24gb", "rtx3090", "a100-40gb", "h100-80gb", "h200", "cpu-server", "cpu-server-cxl"}


def test_shipped_profiles_load_with_sources():
    assert REQUIRED <= set(profiles.shipped_names())
    for name in profiles.shipped_names():
        p = profiles.load(name)
        assert p.tiers[0].kind == "hbm" and p.tier("ssd") is not None
        assert p.device_active_w > 0 and p.price_per_hour_usd > 0 and p.embodied_kgco2 > 0
        assert p.sources and all(t.source for t in p.tiers), f"{name}: every figure says where it comes from"
        assert profiles.from_dict(profiles.to_dict(p)) == p  # the YAML schema round-trips
    cxl = profiles.load("cpu-server-cxl").tier("cxl")
    assert cxl is not None and cxl.numa_node == 1
    local, base = profiles.load("cpu-server-cxl"), profiles.load("cpu-server")
    assert base.tier("ssd").bandwidth < cxl.bandwidth < local.tiers[0].bandwidth  # slower than DRAM, faster than SSD


def test_bad_profiles_fail_clearly(tmp_path):
    with pytest.raises(Exception, match="unknown hardware profile 'nope'.*rtx3090"):
        profiles.load("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndevice: gpu\n")
    with pytest.raises(Exception, match="bad hardware profile"):
        profiles.load(bad)


def test_llama2_shapes_have_their_published_sizes():
    for name, params in (("llama-2-7b", 6.74e9), ("llama-2-13b", 13.0e9), ("llama-2-70b", 69.0e9)):
        assert shapes.named(name).params == pytest.approx(params, rel=0.01)
    assert shapes.named("70b").num_kv_heads == 8
    with pytest.raises(Exception, match="unknown model shape"):
        shapes.named("llama-9")


def test_store_shape_matches_its_manifest(store_root):
    from m2cache.store.reader import NeuronStore

    shape = shapes.resolve(str(store_root / "stories260k"))
    store = NeuronStore(store_root / "stories260k")
    try:
        m = store.manifest
        assert (shape.num_layers, shape.d_model, shape.d_ffn) == (m.num_layers, m.d_model, m.d_ffn)
        assert all(shape.record_bytes(p) == m.layout.num_bytes(p) for p in Precision)
    finally:
        store.close()


def test_cache_model_hit_rates():
    shape = shapes.named("7b")
    full = traffic.ratios_of(None)
    for f in (0.1, 0.25, 0.5):  # every token uses every neuron: the cache's share is the hit rate
        t = traffic.cache_model(shape, full, f, {})
        assert t.hbm / t.used_bytes == pytest.approx(f, rel=1e-6) and t.ssd == pytest.approx(t.miss_bytes)
    mixed = traffic.ratios_of(placement.DEFAULT_MIXED)
    t = traffic.cache_model(shape, mixed, 1.0, {"dram": 1e12}, reuse=0.8)
    assert t.hbm / t.used_bytes == pytest.approx(0.8) and t.ssd == 0 and t.dram == pytest.approx(t.miss_bytes)


def test_power_and_cost_arithmetic():
    raw = profiles.to_dict(profiles.load("m40-24gb"))
    raw["cost"].update(embodied_kgco2=0.0, includes_energy=False, price_per_hour_usd=1.0)
    p = profiles.from_dict(raw)
    tariff = power.Tariff(grid_gco2_per_kwh=820.0, usd_per_kwh=0.5)
    assert power.carbon_g(p, 3.6e6, 3600, tariff) == pytest.approx(820.0)  # 1 kWh at M2Cache's grid
    assert power.cost_usd(p, 3.6e6, 3600, tariff) == pytest.approx(1.5)  # an hour + 1 kWh billed
    c = power.token_cost(p, 0.5, tariff)
    assert c.tok_s == 2 and c.joules_per_token == pytest.approx(power.serving_power_w(p) * 0.5)
    assert c.tok_per_joule == pytest.approx(1 / c.joules_per_token) and c.tok_per_dollar == pytest.approx(1 / c.usd_per_token)


def test_roofline_is_bandwidth_bound_where_it_should_be():
    shape = shapes.named("7b")
    h100 = profiles.load("h100-80gb")
    fits = placement.plan(h100, shape, "full")  # 13.5 GB in 80 GB: all resident, no lower tier
    assert fits.traffic.ssd == 0 and fits.traffic.dram == 0 and fits.row()["hbm_hit_rate"] == 1.0
    t = fits.prediction.terms
    assert fits.prediction.seconds_per_token == pytest.approx(t["fixed"] + max(t["compute"], t["hbm"]))
    assert t["hbm"] == pytest.approx((shape.decode_dense_params * 2 + shape.ffn_bytes) / h100.tiers[0].bandwidth)
    m40 = profiles.load("m40-24gb")
    slow = placement.plan(m40, shapes.named("13b"), "full")  # 26 GB in 24 GB: misses cross PCIe 3.0 from DRAM
    assert slow.prediction.bound == "dram" and slow.traffic.dram > 0 and slow.traffic.ssd == 0
    raw = profiles.to_dict(m40)
    raw["tiers"][1]["bandwidth_gbs"] *= 4
    faster = placement.plan(profiles.from_dict(raw), shapes.named("13b"), "full")
    assert faster.cost.tok_s > 2 * slow.cost.tok_s


def _cpu_with_ssd(warm_read: float = 0.0):
    raw = profiles.to_dict(profiles.load("cpu-server"))
    ssd = next(t for t in raw["tiers"] if t["kind"] == "ssd")
    ssd.update(bandwidth_gbs=0.3, sequential_gbs=0.6)
    raw["engine"]["per_byte_s"] = {"record_full": 1e-10, "record_mixed": 1e-10, "miss": 8e-10, "miss_mixed": 8e-10,
                                   **({"warm_read": warm_read} if warm_read else {})}
    return profiles.from_dict(raw)  # through the YAML schema, as a user's profile


def _misses(shape, ratios: dict, ssd: float, **kw) -> traffic.Traffic:
    used = traffic.used_bytes(shape, ratios)
    return traffic.Traffic(used=used, hbm=sum(used.values()) - ssd, ssd=ssd, through=ssd, dense=float(shape.dense_bytes),
                           ranked=ratios.get("full", 0) < 1, sequential=ratios.get("full", 0) >= 1,
                           **kw)


def test_measured_device_bytes_and_the_warm_read_inside_a_miss():
    """A measured run's SSD term reads what reached the device; a miss byte read cold
    pays the warm page-cache read (inside the engine's warm probe) there, not twice."""
    shape = shapes.named("7b")
    profile = _cpu_with_ssd(warm_read=5e-10)
    cold = _misses(shape, {"full": 1.0}, ssd=1e8, device_bytes=5e7)
    assert cold.cold_share == pytest.approx(0.5)
    assert roofline.io_terms(profile, cold)["ssd"] == pytest.approx(5e7 / 0.6e9)
    c = profile.engine.per_byte_s
    assert roofline.miss_s_per_byte(c, cold, 8e-10) == pytest.approx(8e-10 - 0.5 * 5e-10)
    warm = _misses(shape, {"full": 1.0}, ssd=1e8, device_bytes=0.0)  # all from the page cache: the probe's case
    assert roofline.miss_s_per_byte(c, warm, 8e-10) == pytest.approx(8e-10) and "ssd" not in roofline.io_terms(profile, warm)
    # half the misses from a DRAM tier (its own term), half from the page cache: half the warm read comes out
    redis = dataclasses.replace(warm, dram=5e7, ssd=5e7, through=5e7)
    assert roofline.miss_s_per_byte(c, redis, 8e-10) == pytest.approx(8e-10 - 0.5 * 5e-10)
    assert roofline.io_terms(profile, redis)["dram"] > 0 and "ssd" not in roofline.io_terms(profile, redis)
    assert traffic.Traffic(used={}, hbm=0.0, ssd=1e8, page_cached=0.25).cold_share == pytest.approx(0.75)


def test_cxl_expander_takes_what_local_dram_cannot_hold():
    shape = shapes.named("70b")
    with_cxl = placement.plan(profiles.load("cpu-server-cxl"), shape, "full")
    without = placement.plan(profiles.load("cpu-server"), shape, "full")
    assert with_cxl.placement.lower.get("cxl", 0) > 0 and "--numa-node 1" in with_cxl.flags
    assert not without.placement.lower and without.traffic.ssd > 0
    assert with_cxl.traffic.ssd == 0 and with_cxl.traffic.cxl > 0
    assert with_cxl.cost.tok_s > without.cost.tok_s


def test_plan_cli_writes_table_json_and_plot(tmp_path, capsys):
    out, png, md = tmp_path / "plan.json", tmp_path / "plan.png", tmp_path / "plan.md"
    code = cli.main(["plan", "--model", "llama-2-7b", "--model", "llama-2-70b", "--hardware", "all",
                     "--json", str(out), "--plot", str(png), "--markdown", str(md), "--grid-gco2-per-kwh", "400"])
    assert code == 0
    doc = json.loads(out.read_text())
    for key in ("tok_s", "tok_per_joule", "gco2_per_token", "tok_per_dollar"):
        assert doc[key] > 0 and all(p[key] > 0 for p in doc["plans"])
    assert {p["profile"] for p in doc["plans"]} == set(profiles.shipped_names()) and doc["grid_gco2_per_kwh"] == 400
    assert len(doc["plans"]) == 2 * 2 * len(profiles.shipped_names())  # models x policies x hardware
    assert png.stat().st_size > 10_000 and md.read_text().startswith("| hardware |")
    assert "llama-2-70b" in capsys.readouterr().out


def test_plan_cli_on_a_store_and_a_checkpoint(store_root, tmp_path):
    from checkpoints import make_tiny_checkpoint

    hf = make_tiny_checkpoint("llama", tmp_path / "hf")
    out = tmp_path / "p.json"
    assert cli.main(["plan", "--model", str(store_root / "stories260k"), "--model", str(hf), "--hardware", "rtx3090",
                     "--policy", "full", "--json", str(out)]) == 0
    assert {p["model"] for p in json.loads(out.read_text())["plans"]} == {"stories260k", "hf"}


def test_plan_cli_errors_are_clear(capsys):
    assert cli.main(["plan", "--model", "llama-2-7b", "--hardware", "tpu-v9"]) == 2
    assert "unknown hardware profile 'tpu-v9'" in capsys.readouterr().err
    assert cli.main(["plan", "--hardware", "rtx3090"]) == 2
    assert cli.main(["plan", "--model", "llama-2-7b", "--validate"]) == 2  # validation needs a store
