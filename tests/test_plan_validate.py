"""`m2cache plan` fed by a real `m2cache bench` run, a profile of this machine
measured by the tool, and `--validate` end to end on a tiny model: every
configuration runs through the benchmark harness and comes back with predicted
and measured tok/s side by side. The accuracy itself is a benchmark figure
(docs/PLANNING.md), not asserted here."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from m2cache import cli
from m2cache.planner import profiles

TINY = ["--layers", "2", "--hidden", "64", "--ffn", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "256"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["bench", "--out-dir", str(out), *TINY, "--tokens", "1", "--warmup", "0", "--prompt-len", "4",
                     "--fractions", "1.0", "0.5", "--systems", "m2cache-inprocess", "--fidelity-models"]) == 0
    return out / "results.json", out / "stores" / "synth-l2-h64-f128"


def test_plan_takes_bytes_per_token_from_the_bench(bench_run, tmp_path):
    results, _store = bench_run
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "llama-2-13b", "--hardware", "rtx3090", "--bench", str(results),
                     "--json", str(out)]) == 0
    plans = json.loads(out.read_text())["plans"]
    assert {p["bench_config"] for p in plans} == {f"m2cache-inprocess {pol} {f}%" for pol in ("full", "mixed", "int4")
                                                  for f in (100, 50)}
    half = next(p for p in plans if p["bench_config"] == "m2cache-inprocess full 50%")
    assert half["hbm_hit_rate"] == pytest.approx(0.5, abs=0.02)  # the bench's measured share, on 13B's bytes
    assert all(p["tok_s"] > 0 and p["traffic_source"].startswith("m2cache bench") for p in plans)


def test_measured_profile_of_this_machine(bench_run, tmp_path):
    _results, store = bench_run
    path = tmp_path / "here.yaml"
    assert cli.main(["plan", "--model", str(store), "--measure-profile", str(path), "--out-dir", str(tmp_path / "work")]) == 0
    raw = yaml.safe_load(path.read_text())
    assert raw["measured"] and raw["engine"]["source"].startswith("measured")
    assert raw["engine"]["per_byte_s"]["record_full"] > 0 and raw["engine"]["per_layer_s"] >= 0
    p = profiles.load(path)
    assert {t.kind for t in p.tiers} == {"hbm", "dram", "ssd"} and all(t.bandwidth > 0 for t in p.tiers)
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", str(store), "--hardware", str(path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tok_s"] > 0


def test_validate_runs_the_bench_configurations_side_by_side(bench_run, tmp_path, capsys):
    _results, store = bench_run
    out = tmp_path / "validate.json"
    assert cli.main(["plan", "--model", str(store), "--validate", "--systems", "m2cache-inprocess", "m2cache-stack",
                     "--policy", "full", "--fractions", "0.5", "--tokens", "2", "--out-dir", str(tmp_path / "work"),
                     "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["configurations"]
    assert {(r["system"], r["policy"]) for r in rows} == {("m2cache-inprocess", "full"), ("m2cache-stack", "full")}
    for r in rows:
        assert "failed" not in r, r.get("failed")
        assert r["predicted_tok_s"] > 0 and r["measured_tok_s"] > 0 and math.isfinite(r["error"])
        assert r["fraction"] == 0.5 and r["profile"]["measured"]
    stack = next(r for r in rows if r["system"] == "m2cache-stack")
    # same host: the worker reads the store's file itself, so its misses are SSD-tier bytes, priced as in-process's
    assert stack["bytes_per_token"]["dram"] == 0 and stack["bytes_per_token"]["ssd"] > 0
    assert set(stack["terms_s"]) - {"fixed", "compute", "hbm", "engine"} <= {"ssd"}
    printed = capsys.readouterr().out
    assert "| predicted tok/s | measured tok/s |" in printed and (tmp_path / "work" / "validate.png").is_file()
