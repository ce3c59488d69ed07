"""With everything cached, a decode step copies no weight bytes: the kernels read
the resident records (or the dense path's fused matrices) in place. Counted with
the torch profiler's allocation records over one decode step; the torch fallback,
which gathers and decodes the chosen records, shows the same count catches copies."""
from __future__ import annotations

import pytest
import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from checkpoints import make_tiny_checkpoint
from m2cache.codec.format import Precision
from m2cache.convert.writer import convert
from m2cache.local.loader import load_model, store_fetch
from m2cache.model import kernels
from m2cache.predictors.bands import BandRatios
from m2cache.predictors.ranking import Ranker
from m2cache.store.reader import NeuronStore
from m2cache.worker.provider import CachedProvider, DenseProvider
from m2cache.worker.runtime import build_cache, dense_layers
from worker_stack import random_predictor

WIDE = transformers.LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wide")
    convert(make_tiny_checkpoint("llama", tmp / "hf", config=WIDE), tmp / "store", progress=False)
    s = NeuronStore(tmp / "store")
    yield s
    s.close()


def layer_ffn_bytes(store) -> int:
    m = store.manifest
    return m.d_ffn * m.layout.num_bytes(Precision.FULL)


def allocated_in_one_decode_step(model, provider, choose) -> int:
    """Bytes allocated by one decode step after a short warm-up."""
    kv = model.new_cache(1, 32)
    slot = kv.allocate()
    token = torch.tensor([[3]])
    for _ in range(3):  # warm-up: workspaces sized, cache filled
        provider.begin_step([choose])
        token = model.forward(token, kv, [slot], provider)[:, -1].argmax(-1, keepdim=True)
    provider.begin_step([choose])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model.forward(token, kv, [slot], provider)
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def test_dense_path_copies_no_weights(store):
    model, _tok, _bank = load_model(store)
    fetch = store_fetch(store)
    provider = DenseProvider(dense_layers(store.manifest, fetch, model.dtype))
    allocated = allocated_in_one_decode_step(model, provider, None)
    # activations only (a few [F] vectors per layer): far below one layer's weights
    assert allocated < 0.05 * layer_ffn_bytes(store), allocated


def test_cached_mixed_path_copies_no_weights(store):
    model, _tok, _bank = load_model(store)
    m = store.manifest
    ratios = BandRatios(0.2, 0.25, 0.25)
    choose = Ranker(random_predictor(store), ratios).choose()
    all_precisions = sum(m.layout.num_bytes(p) for p in Precision) / m.layout.num_bytes(Precision.FULL)
    cache = build_cache(m, all_precisions, ratios.to_dict(), window=2)
    assert cache.holds_everything
    fetch = store_fetch(store)
    cache.fill(lambda layer, prec, ids: fetch(layer, prec, ids, layer))
    calls = []
    provider = CachedProvider(cache, m.layout, lambda *a: calls.append(a) or fetch(*a), m.num_layers)
    choice = choose(0, torch.randn(1, 1, m.d_model))
    chosen = sum(ids.numel() * m.layout.num_bytes(p) for p, ids in choice.items())  # record bytes of one layer
    num_chosen = m.num_layers * sum(ids.numel() for ids in choice.values())
    allocated = allocated_in_one_decode_step(model, provider, choose)
    assert not calls, "everything cached: no fetch"
    # Copying a chosen neuron costs at least its record (INT4's is the smallest); a step
    # allocates only scores, ids and record addresses: a few int64 per chosen neuron.
    smallest = min(m.layout.num_bytes(p) for p in Precision)
    assert allocated / num_chosen < smallest / 4, (allocated / num_chosen, smallest)
    # the same step on the torch fallback gathers the chosen records: the count sees it
    with kernels.torch_only():
        copied = allocated_in_one_decode_step(model, provider, choose)
    assert copied > m.num_layers * chosen, (copied, chosen)
