"""The worker's FFN provider. Per layer, top to bottom: choose (each batch row its
own neurons), one call into the HBM cache (look up, fetch and admit the misses,
hand back the bands), start the next layer's prefetch, compute on the cached
records in place.

It computes exactly what ``model.providers.ChoiceProvider`` computes for the
same choice (same kernel, same neuron order per precision), so caching and
prefetching never change results, only where the bytes come from. Budgets that
hold the whole model at full precision use ``DenseProvider`` instead.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from m2cache.codec.format import Precision, RecordLayout
from m2cache.model.ffn import DenseFFN, sparse_ffn
from m2cache.worker.config import prefetch_by_default
from m2cache.worker.neuron_cache import NeuronCache

log = logging.getLogger(__name__)

Choose = Callable[[int, torch.Tensor], dict[Precision, torch.Tensor]]
# (layer, prec, ids [m], current_layer) -> records uint8 [m, rb]
Fetch = Callable[[int, Precision, torch.Tensor, int], torch.Tensor]


@dataclass
class ProviderStats:
    prefetched_used: int = 0
    bytes_fetched: int = 0


@dataclass
class _Staged:
    """Records prefetched for one layer: prec -> (sorted ids [m], records [m, rb])."""

    records: dict[Precision, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class CachedProvider:
    """FFN provider over a :class:`NeuronCache`. ``choose`` is called per row with
    h [1, T, d], as an in-process run of that sequence alone would call it."""

    def __init__(self, cache: NeuronCache, layout: RecordLayout, fetch: Fetch, num_layers: int,
                 prefetch: bool | None = None):
        """``prefetch`` None: the worker's default for the cache's device (worker/config.py)."""
        self.cache = cache
        self.layout = layout
        self.fetch = fetch
        self.num_layers = num_layers
        self.stats = ProviderStats()
        self.step = 0
        self.choose_rows: list[Choose] = []
        if prefetch is None:
            prefetch = prefetch_by_default(cache.device.type)
        # a cache that holds every neuron never misses: nothing to prefetch
        prefetch = prefetch and not cache.holds_everything
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self._staged: dict[int, Future] = {}

    def begin_step(self, choose_rows: list[Choose]) -> None:
        """Start a forward step whose batch rows use these choose functions."""
        self.step += 1
        self.choose_rows = choose_rows

    def close(self) -> None:
        if self._prefetch:
            self._prefetch.shutdown(wait=True, cancel_futures=True)

    # ---- the per-layer path --------------------------------------------------------
    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h: [B, T, d] -> the FFN output [B, T, d]."""
        choices = [choose(layer, h[b : b + 1]) for b, choose in enumerate(self.choose_rows)]
        union = _union(choices)  # prec -> sorted unique ids
        pending = self._staged.pop(layer, None)
        staged = pending.result() if pending is not None else _Staged()
        bands = self.cache.bands(layer, union, self.step, lambda p, ids: self._take(layer, p, ids, staged))
        if self._prefetch and layer + 1 < self.num_layers:
            self._staged[layer + 1] = self._prefetch.submit(self._prefetch_layer, layer + 1, h.detach())
        if len(choices) > 1:  # rows of a batch share one pass over the union, masked per row
            for band in bands:
                band.mask = _row_mask(choices, band.prec, union[band.prec], h.shape[1])
        return sparse_ffn(h, bands, self.layout, self.cache.num_neurons)

    def _take(self, layer: int, prec: Precision, miss_ids: torch.Tensor, staged: _Staged) -> torch.Tensor:
        """Misses' records: from this layer's prefetch where it has them, the rest in one fetch."""
        got = staged.records.get(prec)
        if got is None or not got[0].numel():
            return self._fetch(layer, prec, miss_ids, layer)
        pos = torch.searchsorted(got[0], miss_ids).clamp_max(got[0].numel() - 1)
        found = got[0][pos] == miss_ids
        self.stats.prefetched_used += int(found.sum())
        if bool(found.all()):
            return got[1][pos]
        out = torch.empty((miss_ids.numel(), self.layout.num_bytes(prec)), dtype=torch.uint8)
        out[found] = got[1][pos[found]]
        out[~found] = self._fetch(layer, prec, miss_ids[~found], layer)
        return out

    def _fetch(self, layer: int, prec: Precision, ids: torch.Tensor, current_layer: int) -> torch.Tensor:
        records = self.fetch(layer, prec, ids, current_layer)
        self.stats.bytes_fetched += int(ids.numel()) * self.layout.num_bytes(prec)
        return records

    def _prefetch_layer(self, layer: int, h: torch.Tensor) -> _Staged:
        """Guess layer ``layer``'s neurons from the current FFN input and fetch the
        ones the cache lacks (never admitted here: the compute thread owns the cache)."""
        staged = _Staged()
        try:
            guess = _union([choose(layer, h[b : b + 1]) for b, choose in enumerate(self.choose_rows)])
            for prec, ids in guess.items():
                miss = ids[~self.cache.slots(layer, prec).contains(ids)]
                if miss.numel():
                    staged.records[prec] = (miss, self._fetch(layer, prec, miss, layer - 1))
        except Exception:  # a failed guess only costs the compute thread a fetch
            log.exception("prefetch of layer %d failed", layer)
        return staged


class DenseProvider:
    """Budget >= model: every neuron resident at full precision as fused matrices;
    no ranking, no masks, no cache bookkeeping."""

    def __init__(self, layers: list[DenseFFN]):
        self.layers = layers
        self.steps = 0

    def begin_step(self, choose_rows: list[Choose]) -> None:
        self.steps += 1

    def close(self) -> None:
        pass

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.layers[layer](h)

    @property
    def num_bytes(self) -> int:
        return sum(layer.num_bytes for layer in self.layers)


def _union(choices: list[dict[Precision, torch.Tensor]]) -> dict[Precision, torch.Tensor]:
    """prec -> sorted unique neuron ids chosen at that precision by any row."""
    if len(choices) == 1:
        return {Precision(p): _as_ids(ids) for p, ids in choices[0].items()}
    out: dict[Precision, list[torch.Tensor]] = {}
    for choice in choices:
        for prec, ids in choice.items():
            out.setdefault(Precision(prec), []).append(torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu())
    return {p: torch.unique(torch.cat(v)) for p, v in out.items()}


def _as_ids(ids) -> torch.Tensor:
    """A choice's ids as a flat long CPU tensor (as they are when a chooser made them so)."""
    if isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.dim() == 1 and ids.device.type == "cpu":
        return ids
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()


def _row_mask(choices: list[dict[Precision, torch.Tensor]], prec: Precision, union: torch.Tensor,
              tokens: int) -> torch.Tensor:
    """[B*T, n] 1.0 where batch row b chose union neuron k at ``prec`` (each of its T tokens)."""
    mask = torch.zeros(len(choices), union.numel())
    for b, choice in enumerate(choices):
        ids = choice.get(prec)
        if ids is not None and ids.numel():
            mask[b, torch.searchsorted(union, torch.as_tensor(ids).reshape(-1).cpu())] = 1.0
    return mask.repeat_interleave(tokens, dim=0)
