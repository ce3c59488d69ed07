"""The worker's FFN provider: rank -> HBM cache lookup -> one fetch of the
layer's misses -> decode -> neurons, with the next layer prefetched meanwhile.

It hands the model exactly the floats ``model.providers.ChoiceProvider`` would
(same choice per row, same precision order, same record decoder), so caching
and prefetching never change results, only where the bytes come from.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from m2cache.codec.format import Precision, RecordLayout
from m2cache.model.ffn import NeuronWeights
from m2cache.worker.neuron_cache import NeuronCache

log = logging.getLogger(__name__)

Choose = Callable[[int, torch.Tensor], dict[Precision, torch.Tensor]]
# (layer, prec, ids [m], current_layer) -> records uint8 [m, rb]
Fetch = Callable[[int, Precision, torch.Tensor, int], torch.Tensor]


@dataclass
class ProviderStats:
    hbm_hits: int = 0
    hbm_misses: int = 0
    prefetched_used: int = 0
    bytes_hbm: int = 0
    bytes_fetched: int = 0


@dataclass
class _Staged:
    """Records prefetched for one layer: prec -> (sorted ids [m], records [m, rb])."""

    records: dict[Precision, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class CachedProvider:
    """FFN provider over a :class:`NeuronCache`. ``choose`` is called per row with
    x [1, T, d], as an in-process run of that sequence alone would call it."""

    def __init__(self, cache: NeuronCache, layout: RecordLayout, fetch: Fetch, num_layers: int,
                 prefetch: bool = True, device: torch.device | str = "cpu", layer_hooks=None):
        """``layer_hooks``: optional object with ``begin_step()`` and ``before_ffn(layer)``
        (the dense-layer streamer), called on the per-layer path."""
        self.cache = cache
        self.layout = layout
        self.fetch = fetch
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.stats = ProviderStats()
        self.step = 0
        self.choose_rows: list[Choose] = []
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self._staged: dict[int, Future] = {}
        self.layer_hooks = layer_hooks

    def begin_step(self, choose_rows: list[Choose]) -> None:
        """Start a forward step whose batch rows use these choose functions."""
        self.step += 1
        self.choose_rows = choose_rows
        if self.layer_hooks is not None:
            self.layer_hooks.begin_step()

    def close(self) -> None:
        if self._prefetch:
            self._prefetch.shutdown(wait=True, cancel_futures=True)

    # ---- the per-layer path --------------------------------------------------------
    def __call__(self, layer: int, x: torch.Tensor) -> NeuronWeights | list[NeuronWeights]:
        """x: [B, T, d] -> one NeuronWeights per row (a single one when B == 1)."""
        if self.layer_hooks is not None:
            self.layer_hooks.before_ffn(layer)
        choices = [choose(layer, x[b : b + 1]) for b, choose in enumerate(self.choose_rows)]
        union = _union(choices)  # prec -> sorted unique ids
        pending = self._staged.pop(layer, None)
        staged = pending.result() if pending is not None else _Staged()
        decoded = {p: self._decode(p, self._records(layer, p, ids, staged)) for p, ids in union.items()}
        if self._prefetch and layer + 1 < self.num_layers:
            self._staged[layer + 1] = self._prefetch.submit(self._prefetch_layer, layer + 1, x.detach())
        rows = [self._select(choice, union, decoded) for choice in choices]
        return rows[0] if len(rows) == 1 else rows

    def _records(self, layer: int, prec: Precision, ids: torch.Tensor, staged: _Staged) -> torch.Tensor:
        """Records of sorted ``ids`` [n] -> uint8 [n, rb]: misses fetched once and
        admitted, then the layer's records gathered from the slots in one copy."""
        slots = self.cache.slots(layer, prec)
        hit = slots.contains(ids)
        slots.touch(ids, self.step)  # in the window now: admitting misses cannot evict them
        miss_ids = ids[~hit]
        n_hit = int(ids.numel() - miss_ids.numel())
        self.stats.hbm_hits += n_hit
        self.stats.hbm_misses += int(miss_ids.numel())
        self.stats.bytes_hbm += n_hit * slots.record_bytes
        if miss_ids.numel() == 0:
            return slots.gather(ids)
        fetched = self._take_staged(layer, prec, miss_ids, staged.records.get(prec))
        if slots.admit(miss_ids, fetched, self.step) == miss_ids.numel():
            return slots.gather(ids)
        # the window left no room for some misses: they are used from the fetched bytes
        records = torch.empty((ids.numel(), slots.record_bytes), dtype=torch.uint8, device=slots.slots.device)
        records[hit.to(records.device)] = slots.gather(ids[hit])
        records[(~hit).to(records.device)] = fetched.to(records.device)
        return records

    def _take_staged(self, layer: int, prec: Precision, miss_ids: torch.Tensor,
                     got: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Misses' records: from this layer's prefetch where it has them, the rest in one fetch."""
        rb = self.layout.num_bytes(prec)
        out = torch.empty((miss_ids.numel(), rb), dtype=torch.uint8)
        todo = torch.ones(miss_ids.numel(), dtype=torch.bool)
        if got is not None and got[0].numel():
            pos = torch.searchsorted(got[0], miss_ids).clamp_max(got[0].numel() - 1)
            found = got[0][pos] == miss_ids
            out[found] = got[1][pos[found]]
            todo &= ~found
            self.stats.prefetched_used += int(found.sum())
        if bool(todo.any()):
            out[todo] = self.fetch(layer, prec, miss_ids[todo], layer)
            self.stats.bytes_fetched += int(todo.sum()) * rb
        return out

    def _prefetch_layer(self, layer: int, x: torch.Tensor) -> _Staged:
        """Guess layer ``layer``'s neurons from the current FFN input and fetch the
        ones the cache lacks (never admitted here: the compute thread owns the cache)."""
        staged = _Staged()
        try:
            guess = _union([choose(layer, x[b : b + 1]) for b, choose in enumerate(self.choose_rows)])
            for prec, ids in guess.items():
                miss = ids[~self.cache.slots(layer, prec).contains(ids)]
                if miss.numel():
                    staged.records[prec] = (miss, self.fetch(layer, prec, miss, layer - 1))
                    self.stats.bytes_fetched += miss.numel() * self.layout.num_bytes(prec)
        except Exception:  # a failed guess only costs the compute thread a fetch
            log.exception("prefetch of layer %d failed", layer)
        return staged

    def _decode(self, prec: Precision, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        vectors, bias = self.layout.decode(records, prec)
        return vectors.to(self.device), None if bias is None else bias.to(self.device)

    def _select(self, choice: dict[Precision, torch.Tensor], union: dict[Precision, torch.Tensor],
                decoded: dict) -> NeuronWeights:
        """One row's neurons in its own choice order (as ChoiceProvider concatenates them)."""
        parts, biases = [], []
        for prec, ids in choice.items():
            ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
            vectors, bias = decoded[prec]
            if not torch.equal(ids, union[prec]):  # a row of a batch: pick its neurons
                idx = torch.searchsorted(union[prec], ids).to(self.device)
                vectors = vectors.index_select(0, idx)
                bias = None if bias is None else bias.index_select(0, idx)
            parts.append(vectors)
            if bias is not None:
                biases.append(bias)
        if not parts:
            d = self.layout.d_model
            empty_bias = torch.zeros(0, device=self.device) if self.layout.has_bias else None
            return NeuronWeights(torch.zeros(0, self.layout.nvec, d, device=self.device), empty_bias)
        return NeuronWeights(_cat(parts), _cat(biases) if biases else None)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _union(choices: list[dict[Precision, torch.Tensor]]) -> dict[Precision, torch.Tensor]:
    """prec -> sorted unique neuron ids chosen at that precision by any row."""
    out: dict[Precision, list[torch.Tensor]] = {}
    for choice in choices:
        for prec, ids in choice.items():
            out.setdefault(Precision(prec), []).append(torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu())
    return {p: torch.unique(torch.cat(v)) for p, v in out.items()}
