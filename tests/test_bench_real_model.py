"""``m2cache bench --model X.gguf`` and the trace-driven mode, end to end on tiny
GGUF files (real processes per system, tiny token counts, no timing
assertions), plus the pieces they rest on: the F16 GGUF copy for llama.cpp and
the proportional replay of recorded choices."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import corpus
from gguf_files import tiny_model, write_gguf
from m2cache import cli
from m2cache.codec.format import Precision
from m2cache.predictors.bands import BandRatios

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is not an installed package (as `m2cache bench` does)

from bench.harness.gguf_export import f16_from_gguf  # noqa: E402
from bench.harness.trace import Trace, TracePolicy, overlap_stats, record  # noqa: E402

TINY = ["--tokens", "2", "--warmup", "1", "--prompt-len", "4", "--headroom-mb", "128", "--fidelity-models"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny llama GGUF with a tokenizer (Q8_0), as a user's file would be."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "Tiny-Llama.Q8_0.gguf", tiny_model("llama"), "llama", "Q8_0")


def test_bench_model_gguf_side_by_side(tmp_path, tiny_gguf):
    out = tmp_path / "bench"
    text = corpus("wikitext2/wiki.test.raw")
    code = cli.main(["bench", "--out-dir", str(out), "--model", str(tiny_gguf), "--text", str(text),
                     "--systems", "dense-reference", "transformers-dense", "m2cache-inprocess", "llama.cpp",
                     "--fractions", "1.0", "0.25", "--ppl-tokens", "48", "--ppl-context", "24", *TINY])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    name = "tiny-llama-q8-0"
    assert doc["main_model"] == name and doc["main_model_real"] and doc["main_model_weights"] == "Q8_0"
    results = [r for r in doc["results"] if r["system"] != "llama.cpp"]
    assert not [r["error"] for r in results if "error" in r]
    assert {(r["policy"], r["fraction"]) for r in results if r["system"] == "m2cache-inprocess"} == {
        (p, f) for p in ("full", "mixed", "int4", "oracle") for f in (1.0, 0.25)}
    llama = [r for r in doc["results"] if r["system"] == "llama.cpp"]
    assert {r["policy"] for r in llama} == {"gguf-q8_0", "gguf-f16"}
    if importlib.util.find_spec("llama_cpp") is not None:  # an optional peer (docs/BENCHMARKS.md)
        assert not [r["error"] for r in llama if "error" in r]
        assert all(r["tokens"] == 2 and r["info"]["threads"] == 2 for r in llama)
    else:
        assert all("llama-cpp-python is not installed" in r["error"] for r in llama)
    full = next(f for f in doc["fidelity"] if f["system"] == "m2cache-inprocess")
    assert full["identical"]
    # the peers' copies, made once in the out dir
    assert (out / "models" / f"{name}-hf" / "config.json").is_file()
    assert (out / "models" / f"{name}.F16.gguf").is_file()
    # held-out perplexity per policy, the uniform ones a batched and the others a stepwise measurement
    ppl = {r["policy"]: r for r in doc["perplexity"]}
    assert set(ppl) == {"full", "int8", "int4", "mixed", "oracle"}
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 and r["tokens"] == 48 for r in ppl.values())
    assert abs(ppl["int8"]["perplexity"] / ppl["full"]["perplexity"] - 1) < 0.05
    # the goals at the 25% budget are printed for each policy
    names = {(t["policy"], t["target"]) for t in doc["targets"]}
    for policy in ("full", "mixed", "oracle"):
        assert (policy, "in-process HBM hit rate (window 4)") in names
        assert (policy, "in-process SSD bytes per token, % of FFN") in names
    md = (out / "results.md").read_text()
    assert "Held-out perplexity of tiny-llama-q8-0" in md and "INT8 is nearly free" in md


def test_trace_driven_replay_on_the_synthetic_model(tmp_path, tiny_gguf):
    out = tmp_path / "bench"
    code = cli.main(["bench", "--out-dir", str(out), "--layers", "3", "--hidden", "64", "--ffn", "1280",
                     "--heads", "4", "--kv-heads", "2", "--vocab", "256", "--trace-from", str(tiny_gguf),
                     "--text", str(corpus("wikitext2/wiki.test.raw")), "--trace-tokens", "12",
                     "--systems", "m2cache-inprocess", "llama.cpp", "--policies", "trace-driven", "--fractions", "0.5",
                     *TINY])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    (r,) = [r for r in doc["results"] if r["system"] == "m2cache-inprocess"]
    assert "error" not in r, r["error"]
    assert r["policy"] == "trace-driven" and r["predictor"].startswith("trace-driven: oracle choices of")
    assert "neurons 512->1280, layers 2->3" in r["predictor"]
    assert doc["trace"]["tokens"] == 11 and doc["trace"]["chooser"] == "oracle"
    assert 0 <= doc["trace"]["locality"]["reuse_in_window"] <= 1
    assert "| m2cache-inprocess | trace-driven |" in (out / "results.md").read_text()
    llama = [r for r in doc["results"] if r["system"] == "llama.cpp"]  # the synthetic model exported to GGUF
    assert {r["policy"] for r in llama} == {"gguf-f16", "gguf-q4_1"}
    if importlib.util.find_spec("llama_cpp") is not None:
        assert not [r["error"] for r in llama if "error" in r]
        f16 = next(r for r in llama if r["policy"] == "gguf-f16")
        assert f16["info"]["weights"] == "F16" and f16["tokens"] == 2
        assert next(r for r in llama if r["policy"] == "gguf-q4_1")["info"]["weights"] == "Q4_1"
    else:
        assert all("llama-cpp-python is not installed" in r["error"] for r in llama)


def _hand_trace() -> Trace:
    """2 layers of 8 neurons, 3 tokens."""
    def step(a, b):
        return [{int(Precision.FULL): torch.tensor(a, dtype=torch.int32), int(Precision.INT4): torch.tensor(b)}
                for _ in range(2)]
    steps = [step([0, 1], [7]), step([1, 2], [6]), step([0, 1], [5])]
    return Trace("real", "oracle", "text", BandRatios(0.25, 0.0, 0.125).to_dict(), 2, 8, 3.0, steps)


def test_trace_policy_maps_layers_neurons_and_tokens_proportionally():
    policy = TracePolicy(_hand_trace(), num_layers=4, d_ffn=24)
    assert policy.layer_map == [0, 0, 1, 1]
    choose = policy.choose()
    x = torch.zeros(1, 1, 4)
    first = choose(0, x)  # token 0
    assert first[Precision.FULL].tolist() == [0, 1, 2, 3, 4, 5] and first[Precision.INT4].tolist() == [21, 22, 23]
    assert choose(2, x)[Precision.FULL].tolist() == [0, 1, 2, 3, 4, 5]  # same token, a later layer
    assert choose(0, x)[Precision.FULL].tolist() == [3, 4, 5, 6, 7, 8]  # layer 0 again: the next token
    choose(0, x)
    assert choose(0, x)[Precision.FULL].tolist() == [0, 1, 2, 3, 4, 5]  # wraps around after 3 tokens
    odd = TracePolicy(_hand_trace(), num_layers=2, d_ffn=20)  # 2.5 wide neurons per real one
    assert odd.wide_ids(torch.arange(8)).tolist() == list(range(20))  # every wide neuron exactly once
    assert odd.wide_ids(torch.tensor([0, 1])).tolist() == [0, 1, 2, 3, 4]
    stats = overlap_stats(_hand_trace(), window=1)
    assert stats["kept_fraction"] == 3 / 8 and stats["reuse_in_window"] == pytest.approx(2 / 6)
    assert stats["same_band_reuse_in_window"] == pytest.approx(2 / 6)  # FULL 1 repeats; INT4 7, 6, 5 never do
    moved = _hand_trace()
    moved.steps[1] = [{int(Precision.FULL): torch.tensor([7], dtype=torch.int32),
                       int(Precision.INT4): torch.tensor([0, 1], dtype=torch.int32)} for _ in range(2)]
    stats = overlap_stats(moved, window=1)  # token 1 keeps token 0's neurons, each in the other band
    assert stats["reuse_in_window"] == pytest.approx(5 / 6) and stats["same_band_reuse_in_window"] == 0


def test_record_trace_keeps_every_layers_band_choice(tmp_path, tiny_gguf):
    from m2cache.convert.writer import convert

    store = tmp_path / "store"
    convert(tiny_gguf, store, progress=False)
    ratios = BandRatios(0.1, 0.2, 0.3)
    trace = record(store, [261, 40, 50, 60, 70, 80], "oracle", ratios, "ids")
    assert len(trace.steps) == 5 and trace.num_layers == 2 and trace.d_ffn == 512
    counts = ratios.counts(512)
    for step in trace.steps:
        for layer in step:
            sizes = [layer[int(p)].numel() for p in Precision]
            assert sizes == list(counts)
            kept = torch.cat(list(layer.values()))
            assert kept.unique().numel() == kept.numel()  # bands are disjoint
    saved = trace.save(tmp_path / "t.pt")
    again = Trace.load(saved)
    assert again.meta() == trace.meta() and torch.equal(again.steps[3][1][1], trace.steps[3][1][1])


def test_f16_copy_keeps_metadata_and_values(tmp_path, tiny_gguf):
    import gguf
    from gguf.quants import dequantize

    dst = f16_from_gguf(tiny_gguf, tmp_path / "f16.gguf")
    src, out = gguf.GGUFReader(tiny_gguf), gguf.GGUFReader(dst)
    assert out.fields["general.file_type"].contents() == 1  # MOSTLY_F16
    for key, field in src.fields.items():
        if not key.startswith("GGUF.") and key != "general.file_type":
            assert out.fields[key].contents() == field.contents(), key
    by_name = {t.name: t for t in out.tensors}
    assert set(by_name) == {t.name for t in src.tensors}
    for t in src.tensors:
        copy = by_name[t.name]
        want = dequantize(t.data, t.tensor_type)
        if want.ndim >= 2:
            assert copy.tensor_type == gguf.GGMLQuantizationType.F16
            assert np.array_equal(np.asarray(copy.data), want.astype(np.float16))
        else:
            assert copy.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(copy.data, want)
    assert f16_from_gguf(tiny_gguf, dst) == dst  # reused, not rewritten
