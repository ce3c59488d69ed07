"""In-process systems over the model (m2cache.model), one FFN provider each,
same greedy loop:

- ``DenseReference``: every neuron resident as fused matrices in the compute
  dtype (FullProvider), the dense path;
- ``NaiveStreaming``: every layer's FFN read from the store (NeuronStore.get_layer)
  and decoded at every token: nothing cached;
- ``M2CacheLocal``: the worker's CachedProvider over a NeuronCache whose misses
  are read straight from a local NeuronStore (no RPC), prefetching as the worker
  does by default (not on CPU);
  at a budget >= 100% with every neuron FULL, the worker's dense path.

Counters are cumulative bytes per tier (records as stored: fp16 FULL, packed
INT8/INT4) and HBM hits/misses; the harness differences them.
"""
from __future__ import annotations

import torch

from m2cache.codec.format import Precision
from m2cache.store.reader import NeuronStore
from m2cache.model.ffn import DenseFFN
from m2cache.model.generate import Sampling, decode_one_token, prefill
from m2cache.local.loader import load_model, store_fetch
from m2cache.model.providers import FullProvider
from m2cache.worker.choosers import full_choose
from m2cache.worker.neuron_cache import NeuronCache
from m2cache.worker.provider import CachedProvider, DenseProvider
from m2cache.worker.runtime import build_cache as worker_cache

GREEDY = Sampling()


def greedy_loop(model, prompt_ids: list[int], n_new: int, ffn, on_token, before_step=lambda: None) -> list[int]:
    """Prefill then decode up to ``n_new - 1`` tokens greedily (stopping at EOS, as the
    worker and ``generate`` do); ``on_token(i, id)`` after each."""
    eos = set(model.config.eos_token_ids)
    cache = model.new_cache(1, max_len=len(prompt_ids) + n_new)
    slots = torch.tensor([cache.allocate()])
    before_step()
    token = prefill(model, torch.tensor([prompt_ids]), cache, slots, ffn, GREEDY)
    out = [int(token)]
    on_token(0, out[-1])
    while len(out) < n_new and out[-1] not in eos:
        before_step()
        token = decode_one_token(model, token, cache, slots, ffn, GREEDY)
        out.append(int(token))
        on_token(len(out) - 1, out[-1])
    return out


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DenseReference:
    """The model with every FFN neuron resident as fused matrices (the dense path)."""

    name = "dense-reference"

    def __init__(self, store_path):
        self.store = NeuronStore(store_path)
        self.model, _tok, self.bank = load_model(self.store, drop_pages=True, tokenizer=False)
        m = self.store.manifest
        ffn = [self.bank.dense(layer) for layer in range(m.num_layers)]
        self.tokens_done = 0
        self.provider = FullProvider(self.bank)
        self.info = {"compute_dtype": str(self.model.dtype).removeprefix("torch."),
                     "ffn_resident_bytes": sum(f.num_bytes for f in ffn)}

    def generate(self, prompt_ids, n_new, on_token):
        def count(i, tok):
            self.tokens_done += 1
            on_token(i, tok)
        return greedy_loop(self.model, prompt_ids, n_new, self.provider, count)

    def counters(self) -> dict:
        ffn = self.info["ffn_resident_bytes"]
        return {"hbm_bytes": ffn * self.tokens_done, "hbm_hits": 0, "hbm_misses": 0}

    def close(self):
        self.store.close()


class NaiveStreaming:
    """Every layer's whole FFN read from the store and decoded at every token."""

    name = "naive-streaming"

    def __init__(self, store_path):
        self.store = NeuronStore(store_path)
        self.model, _tok, _bank = load_model(self.store, drop_pages=True, tokenizer=False)
        self.ssd_bytes = 0
        self.info = {"reads": "NeuronStore.get_layer (LMDB, one layer, every token)"}

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        payload = self.store.get_layer(layer, Precision.FULL)
        self.ssd_bytes += len(payload)
        vectors, bias = self.store.layout.decode_bytes(payload, Precision.FULL)
        return DenseFFN.from_vectors(vectors, bias, self.model.dtype)(h)

    def generate(self, prompt_ids, n_new, on_token):
        return greedy_loop(self.model, prompt_ids, n_new, self, on_token)

    def counters(self) -> dict:
        return {"ssd_bytes": self.ssd_bytes}

    def close(self):
        self.store.close()


def all_resident_fraction(manifest, ratios: dict | None) -> float:
    """The budget (fraction of the FFN's FULL bytes) that holds every neuron at every
    precision the policy uses: the mixed policy's "everything cached" configuration."""
    layout = manifest.layout
    used = [p for p in Precision if (ratios or {"full": 1.0}).get(p.name.lower(), 0.0) > 0]
    return sum(layout.num_bytes(p) for p in used) / layout.num_bytes(Precision.FULL)


class M2CacheLocal:
    """m2cache in one process: HBM neuron cache, misses from the local store."""

    name = "m2cache-inprocess"

    def __init__(self, store_path, fraction: float, mixed=None, window: int = 4):
        self.store = NeuronStore(store_path)
        self.model, _tok, _bank = load_model(self.store, drop_pages=True, tokenizer=False)
        m = self.store.manifest
        if mixed is None:
            self.choose, ratios = full_choose(m.d_ffn), None
        else:
            self.choose, ratios = mixed.choose(), mixed.ratios.to_dict()
        fetch = store_fetch(self.store)
        if fraction >= 1 and mixed is not None:  # "100%" of a mixed policy: every precision it uses resident
            fraction = all_resident_fraction(m, ratios)
        self.cache = worker_cache(m, 0.0 if fraction >= 1 and mixed is None else fraction, ratios, window)
        if self.cache.holds_everything:
            self.cache.fill(lambda layer, prec, ids: fetch(layer, prec, ids, layer))
        if fraction >= 1 and mixed is None:  # the worker's dense path
            from m2cache.worker.runtime import dense_layers
            self.provider = DenseProvider(dense_layers(m, fetch, self.model.dtype))
            self.path = "dense"
        else:
            self.provider = CachedProvider(self.cache, self.store.layout, fetch, m.num_layers)
            self.path = "cached"
        budget = self.provider.num_bytes if self.path == "dense" else self.cache.budget_bytes
        self.info = {"cache_budget_bytes": budget, "window": window, "ratios": ratios, "path": self.path,
                     "budget_fraction": fraction,
                     "compute_dtype": str(self.model.dtype).removeprefix("torch.")}

    def generate(self, prompt_ids, n_new, on_token):
        return greedy_loop(self.model, prompt_ids, n_new, self.provider, on_token,
                           before_step=lambda: self.provider.begin_step([self.choose]))

    def counters(self) -> dict:
        if self.path == "dense":  # every neuron read from fast memory every step: all hits
            m = self.store.manifest
            return {"hbm_bytes": self.provider.num_bytes * self.provider.steps, "ssd_bytes": 0,
                    "hbm_hits": m.num_layers * m.d_ffn * self.provider.steps, "hbm_misses": 0}
        c = self.cache.stats
        return {"hbm_bytes": c.bytes_hit, "ssd_bytes": self.provider.stats.bytes_fetched, "hbm_hits": c.hits,
                "hbm_misses": c.misses}

    def close(self):
        self.provider.close()
        self.store.close()


def touch_cache(cache: NeuronCache) -> NeuronCache:
    """Write every slot once: the preallocated fast memory is resident before timing starts."""
    for layer in cache.layers:
        for slots in layer.values():
            slots.records.zero_()
    return cache
