"""FFN providers for the reference model: where a layer's neurons come from.

``WeightBank`` holds every neuron of every layer decoded to float at each
precision (decoded lazily, once); providers pick from it:
- ``FullProvider(bank)``: all neurons at FULL precision (dense behaviour);
- ``ChoiceProvider(bank, choose)``: ``choose(layer, x) -> {Precision: neuron ids}``,
  a sparse mixed-precision selection (the ranker supplies choose functions).
"""
from __future__ import annotations

from typing import Callable

import torch

from m2cache.codec.format import Precision
from m2cache.model.ffn import NeuronWeights

# (layer, precision) -> (vectors [F, nvec, d] float32, bias [F] float32 | None)
NeuronSource = Callable[[int, Precision], tuple[torch.Tensor, torch.Tensor | None]]
# (layer, ffn input x [B, T, d]) -> {precision: neuron ids (LongTensor [n_p])}
Choose = Callable[[int, torch.Tensor], dict[Precision, torch.Tensor]]


class WeightBank:
    """Decoded float32 weights of every neuron, per (layer, precision), on ``device``."""

    def __init__(self, num_layers: int, num_neurons: int, source: NeuronSource, device: str | torch.device = "cpu"):
        self.num_layers = num_layers
        self.num_neurons = num_neurons
        self.device = torch.device(device)
        self._source = source
        self._vectors: dict[tuple[int, Precision], torch.Tensor] = {}
        self._bias: dict[int, torch.Tensor | None] = {}

    @classmethod
    def from_store(cls, store, device: str | torch.device = "cpu") -> "WeightBank":
        """From a NeuronStore: exactly the floats the store's records decode to."""
        m = store.manifest

        def source(layer: int, prec: Precision):
            return store.layout.decode_bytes(store.get_layer(layer, prec), prec)

        return cls(m.num_layers, m.d_ffn, source, device)

    def vectors(self, layer: int, prec: Precision) -> torch.Tensor:
        """[F, nvec, d] float32: every neuron of ``layer`` at ``prec``."""
        key = (layer, Precision(prec))
        if key not in self._vectors:
            vectors, bias = self._source(layer, key[1])
            self._vectors[key] = vectors.float().to(self.device)
            self._bias.setdefault(layer, None if bias is None else bias.float().to(self.device))
        return self._vectors[key]

    def bias(self, layer: int) -> torch.Tensor | None:
        """[F] float32 fc1 bias (identical at every precision) or None."""
        if layer not in self._bias:
            self.vectors(layer, Precision.FULL)
        return self._bias[layer]

    def weights(self, layer: int, prec: Precision) -> NeuronWeights:
        """All neurons of ``layer`` at one precision."""
        return NeuronWeights(self.vectors(layer, prec), self.bias(layer))

    def select(self, layer: int, choice: dict[Precision, torch.Tensor]) -> NeuronWeights:
        """Concatenate the chosen neurons, precision by precision -> [n, nvec, d] (+ bias [n])."""
        parts, biases = [], []
        bias = self.bias(layer)
        for prec, ids in choice.items():
            ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
            parts.append(self.vectors(layer, prec).index_select(0, ids))
            if bias is not None:
                biases.append(bias.index_select(0, ids))
        if not parts:  # no neuron chosen: the FFN contributes nothing
            nvec, d = self.vectors(layer, Precision.FULL).shape[1:]
            return NeuronWeights(torch.zeros(0, nvec, d, device=self.device), None if bias is None else bias[:0])
        return NeuronWeights(torch.cat(parts), torch.cat(biases) if bias is not None else None)


class FullProvider:
    """Every neuron at FULL precision: the dense model."""

    def __init__(self, bank: WeightBank):
        self.bank = bank

    def __call__(self, layer: int, x: torch.Tensor) -> NeuronWeights:
        return self.bank.weights(layer, Precision.FULL)


class ChoiceProvider:
    """Neurons picked by ``choose(layer, x) -> {Precision: ids}`` at every layer and step."""

    def __init__(self, bank: WeightBank, choose: Choose):
        self.bank = bank
        self.choose = choose

    def __call__(self, layer: int, x: torch.Tensor) -> NeuronWeights:
        return self.bank.select(layer, self.choose(layer, x))


def uniform_choose(bank: WeightBank, prec: Precision | str | int) -> Choose:
    """A choose function giving every neuron at one precision (e.g. all INT8)."""
    prec = Precision.parse(prec)
    all_ids = torch.arange(bank.num_neurons, device=bank.device)

    def choose(layer: int, x: torch.Tensor) -> dict[Precision, torch.Tensor]:
        return {prec: all_ids}

    return choose
