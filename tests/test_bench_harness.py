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
