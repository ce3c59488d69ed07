"""`m2cache bench` end to end on a tiny synthetic model with tiny token counts:
every system runs in its own process and the JSON has sane fields. No timing
assertions (the figures are for docs/BENCHMARKS.md, not for CI). The optional
llama.cpp peer is covered by tests/test_bench_real_model.py."""
from __future__ import annotations

import json

from m2cache import cli

SYSTEMS = {"dense-reference", "transformers-dense", "accelerate-offload", "naive-streaming",
           "m2cache-inprocess", "m2cache-stack"}


def test_bench_runs_every_system(tmp_path):
    out = tmp_path / "bench"
    code = cli.main(["bench", "--out-dir", str(out), "--layers", "2", "--hidden", "64", "--ffn", "128",
                     "--heads", "4", "--kv-heads", "2", "--vocab", "256", "--tokens", "1", "--warmup", "0",
                     "--prompt-len", "4", "--fractions", "1.0", "--accelerate-fractions", "0.5",
                     "--headroom-mb", "128", "--fidelity-models", "--systems", *sorted(SYSTEMS)])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    results = doc["results"]
    assert {r["system"] for r in results} == SYSTEMS
    assert not [r for r in results if "error" in r], [r["error"] for r in results if "error" in r]
    assert {(r["system"], r["policy"]) for r in results if r["system"].startswith("m2cache")} == {
        ("m2cache-inprocess", "full"), ("m2cache-inprocess", "mixed"), ("m2cache-inprocess", "int4"),
        ("m2cache-stack", "full"), ("m2cache-stack", "mixed")}
    for r in results:
        assert r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and r["peak_rss_bytes"] > 0
        assert set(r["bytes_per_token"]) == {"hbm", "dram", "ssd"}
        assert all(v >= 0 for v in r["bytes_per_token"].values())
        assert r["tokens"] == 1 and len(r["generated_ids"]) == 2
    naive = next(r for r in results if r["system"] == "naive-streaming")
    assert naive["bytes_per_token"]["ssd"] == doc["ffn_bytes"]  # the whole FFN, every token
    for r in results:
        if r["system"].startswith("m2cache") and r["policy"] == "full":
            assert r["hbm_hit_rate"] == 1.0  # 100% budget, after prefill every neuron is cached
    assert all(f["identical"] for f in doc["fidelity"] if f["system"] != "transformers-dense"), doc["fidelity"]
    assert set(doc["bandwidth"]) == {"ssd_records", "ssd_sequential", "dram", "hbm"}
    assert (out / "results.md").is_file() and all((out / p).is_file() for p in
                                                 ("bench_tokens_per_s.png", "bench_bytes_per_token.png"))


def test_each_budget_is_measured_in_its_own_child(tmp_path):
    """A budget's peak memory must be its own: an earlier budget's bigger cache leaves heap
    behind in the process (6.5 MiB at 25% after 100% on SmolLM2), so every m2cache and
    Accelerate budget gets a child of its own."""
    from pathlib import Path

    from bench.harness.models import BenchModel
    from bench.harness.run import BenchConfig, specs_for

    cfg = BenchConfig(out_dir=tmp_path, fractions=(1.0, 0.25), accelerate_fractions=(0.5, 0.25),
                      systems=("transformers-dense", "accelerate-offload", "m2cache-inprocess", "m2cache-stack"),
                      policies=("full", "mixed"))
    specs = specs_for(cfg, BenchModel(name="m", hf_dir=Path("hf")), [1, 2])
    runs = sorted((s["kind"], s["policy"], tuple(s["fractions"])) for s in specs if s["kind"] != "transformers-dense")
    assert runs == sorted([("accelerate-offload", "full", (0.5,)), ("accelerate-offload", "full", (0.25,))] + [
        (k, p, (f,)) for k in ("m2cache-inprocess", "m2cache-stack") for p in ("full", "mixed") for f in (1.0, 0.25)])
