"""In-process systems over the reference model (m2cache.model), one FFN
provider each, same greedy loop:

- ``DenseReference``: every neuron decoded once and kept resident (FullProvider);
- ``NaiveStreaming``: every layer's FFN read from the store (NeuronStore.get_layer)
  and decoded at every token: nothing cached;
- ``M2CacheLocal``: the worker's CachedProvider over a NeuronCache whose misses
  are read straight from a local NeuronStore (no RPC), with its prefetch thread.

Counters are cumulative bytes per tier (records as stored: fp16 FULL, packed
INT8/INT4) and HBM hits/misses; the harness differences them.
"""
from __future__ import annotations

import numpy as np
import torch

from m2cache.codec.format import Precision
from m2cache.store.reader import NeuronStore
from m2cache.model.ffn import NeuronWeights
from m2cache.model.generate import Sampling, decode_one_token, prefill
from m2cache.model.loader import load_model
from m2cache.model.providers import FullProvider
from m2cache.worker.choosers import full_choose
from m2cache.worker.neuron_cache import NeuronCache
from m2cache.worker.provider import CachedProvider
from m2cache.worker.runtime import cache_shares

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
    """The reference model with every FFN neuron resident (float32, decoded once)."""

    name = "dense-reference"

    def __init__(self, store_path):
        self.store = NeuronStore(store_path)
        self.model, _tok, self.bank = load_model(self.store)
        m = self.store.manifest
        ffn = [self.bank.vectors(layer, Precision.FULL) for layer in range(m.num_layers)]
        self.tokens_done = 0
        self.provider = FullProvider(self.bank)
        self.info = {"compute_dtype": "float32", "ffn_resident_bytes": _tensor_bytes(ffn)}

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
        self.model, _tok, _bank = load_model(self.store)
        self.ssd_bytes = 0
        self.info = {"reads": "NeuronStore.get_layer (LMDB, one layer, every token)"}

    def __call__(self, layer: int, x: torch.Tensor) -> NeuronWeights:
        payload = self.store.get_layer(layer, Precision.FULL)
        self.ssd_bytes += len(payload)
        return NeuronWeights(*self.store.layout.decode_bytes(payload, Precision.FULL))

    def generate(self, prompt_ids, n_new, on_token):
        return greedy_loop(self.model, prompt_ids, n_new, self, on_token)

    def counters(self) -> dict:
        return {"ssd_bytes": self.ssd_bytes}

    def close(self):
        self.store.close()


def store_fetch(store: NeuronStore):
    """The CachedProvider fetch: records straight from the local LMDB store."""
    def fetch(layer: int, prec: Precision, ids: torch.Tensor, current_layer: int) -> torch.Tensor:
        rb = store.layout.num_bytes(prec)
        raw = store.get_neurons(layer, ids.numpy(), prec)
        return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(len(ids), rb).copy())
    return fetch


def build_cache(manifest, fraction: float, ratios: dict | None, window: int) -> NeuronCache:
    """The worker's cache sizing (runtime.WorkerRuntime), slots touched so they are resident."""
    layout = manifest.layout
    ffn_bytes = manifest.num_layers * manifest.d_ffn * layout.num_bytes(Precision.FULL)
    cache = NeuronCache.with_budget(manifest.num_layers, manifest.d_ffn, {p: layout.num_bytes(p) for p in Precision},
                                    int(ffn_bytes * fraction), cache_shares(ratios, manifest), window)
    return touch_cache(cache)


def touch_cache(cache: NeuronCache) -> NeuronCache:
    """Write every slot once: the preallocated fast memory is resident before timing starts."""
    for layer in cache.layers:
        for slots in layer.values():
            slots.slots.zero_()
    return cache


class M2CacheLocal:
    """m2cache in one process: HBM neuron cache + prefetch, misses from local LMDB."""

    name = "m2cache-inprocess"

    def __init__(self, store_path, fraction: float, mixed=None, window: int = 4):
        self.store = NeuronStore(store_path)
        self.model, _tok, _bank = load_model(self.store)
        m = self.store.manifest
        if mixed is None:
            self.choose, ratios = full_choose(m.d_ffn), None
        else:
            self.choose, ratios = mixed.choose(), mixed.ratios.to_dict()
        self.cache = build_cache(m, fraction, ratios, window)
        self.provider = CachedProvider(self.cache, self.store.layout, store_fetch(self.store), m.num_layers)
        self.info = {"cache_budget_bytes": self.cache.budget_bytes, "window": window, "ratios": ratios}

    def generate(self, prompt_ids, n_new, on_token):
        return greedy_loop(self.model, prompt_ids, n_new, self.provider, on_token,
                           before_step=lambda: self.provider.begin_step([self.choose]))

    def counters(self) -> dict:
        s = self.provider.stats
        return {"hbm_bytes": s.bytes_hbm, "ssd_bytes": s.bytes_fetched, "hbm_hits": s.hbm_hits,
                "hbm_misses": s.hbm_misses}

    def close(self):
        self.provider.close()
        self.store.close()
