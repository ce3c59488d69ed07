"""FFN providers over a resident bank of every neuron (the in-process model,
training, evaluation): where a layer's FFN comes from when nothing is cached.

``WeightBank`` holds every neuron of every layer as stored records (the bytes
the kernels compute from), and on request their decoded float vectors
(training targets, the oracle) or fused dense matrices (the dense path):
- ``FullProvider(bank)``: all neurons at FULL precision, fused dense matrices;
- ``ChoiceProvider(bank, choose)``: ``choose(layer, h) -> {Precision: ids}``,
  a sparse mixed-precision selection computed from the records (the ranker
  supplies choose functions). The worker's HBM-cached provider computes the
  same floats for the same choice (same kernel, same neuron order).
"""
from __future__ import annotations

from typing import Callable

import torch

from m2cache.codec.format import Precision, RecordLayout
from m2cache.model.ffn import Band, DenseFFN, sparse_ffn

# (layer, precision) -> stored records uint8 [F, record_bytes] (dense codec)
RecordSource = Callable[[int, Precision], torch.Tensor]
# (layer, ffn input h [B, T, d]) -> {precision: neuron ids (LongTensor [n_p], ascending)}
Choose = Callable[[int, torch.Tensor], dict[Precision, torch.Tensor]]


class WeightBank:
    """Every neuron of every layer, per (layer, precision), on ``device``."""

    def __init__(self, num_layers: int, num_neurons: int, layout: RecordLayout, source: RecordSource,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.num_layers = num_layers
        self.num_neurons = num_neurons
        self.layout = layout
        self.device = torch.device(device)
        self.dtype = dtype  # compute dtype of the dense path
        self._source = source
        self._records: dict[tuple[int, Precision], torch.Tensor] = {}
        self._vectors: dict[tuple[int, Precision], torch.Tensor] = {}
        self._bias: dict[int, torch.Tensor | None] = {}
        self._dense: dict[int, DenseFFN] = {}

    @classmethod
    def from_store(cls, store, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "WeightBank":
        """From a NeuronStore: exactly the records it holds (bitmap records decoded)."""
        m = store.manifest
        layout = store.layout

        def source(layer: int, prec: Precision) -> torch.Tensor:
            raw = store.get_layer(layer, prec)
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(m.d_ffn, layout.num_bytes(prec))

        return cls(m.num_layers, m.d_ffn, layout, source, device, dtype)

    def records(self, layer: int, prec: Precision) -> torch.Tensor:
        """uint8 [F, record_bytes] of every neuron of ``layer`` at ``prec``."""
        key = (layer, Precision(prec))
        if key not in self._records:
            self._records[key] = self._source(layer, key[1]).to(self.device)
        return self._records[key]

    def vectors(self, layer: int, prec: Precision) -> torch.Tensor:
        """[F, nvec, d] float32: every neuron of ``layer`` decoded at ``prec``."""
        key = (layer, Precision(prec))
        if key not in self._vectors:
            vectors, bias = self.layout.decode(self.records(layer, prec), key[1])
            self._vectors[key] = vectors.float().to(self.device)
            self._bias.setdefault(layer, None if bias is None else bias.float().to(self.device))
        return self._vectors[key]

    def bias(self, layer: int) -> torch.Tensor | None:
        """[F] float32 fc1 bias (identical at every precision) or None."""
        if layer not in self._bias:
            self.vectors(layer, Precision.FULL)
        return self._bias[layer]

    def dense(self, layer: int) -> DenseFFN:
        """Every neuron at FULL precision as fused matrices in the compute dtype."""
        if layer not in self._dense:
            vectors, bias = self.layout.decode(self.records(layer, Precision.FULL), Precision.FULL)
            self._dense[layer] = DenseFFN.from_vectors(vectors.to(self.device), bias, self.dtype)
        return self._dense[layer]

    def band(self, layer: int, prec: Precision, ids: torch.Tensor) -> Band:
        """The records of ``ids`` (ascending) at ``prec``, read in place."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        return Band(Precision(prec), ids, (self.records(layer, prec),), ids)


class FullProvider:
    """Every neuron at FULL precision: the dense model (fused matrices)."""

    def __init__(self, bank: WeightBank):
        self.bank = bank

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.bank.dense(layer)(h)


class ChoiceProvider:
    """Neurons picked by ``choose(layer, h) -> {Precision: ids}`` at every layer and step."""

    def __init__(self, bank: WeightBank, choose: Choose):
        self.bank = bank
        self.choose = choose

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        choice = self.choose(layer, h)
        bands = [self.bank.band(layer, p, ids.cpu()) for p, ids in sorted(choice.items()) if ids.numel()]
        return sparse_ffn(h, bands, self.bank.layout, self.bank.num_neurons)


def uniform_choose(bank: WeightBank, prec: Precision | str | int) -> Choose:
    """A choose function giving every neuron at one precision (e.g. all INT8)."""
    prec = Precision.parse(prec)
    all_ids = torch.arange(bank.num_neurons)

    def choose(layer: int, x: torch.Tensor) -> dict[Precision, torch.Tensor]:
        return {prec: all_ids}

    return choose
