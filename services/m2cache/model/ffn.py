"""The sparse FFN. A layer's FFN is a sum over neurons; the model computes it
over whatever subset of neurons (at whatever precisions) an ``FFNProvider``
hands it, already decoded to float. Neurons (see codec/format.py):
SwiGLU nvec=3 (gate row, up row, down column); ReLU nvec=2 (fc1 row, fc2 column) + fc1 bias."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class NeuronWeights:
    """The neurons one layer computes with at this step."""

    vectors: torch.Tensor  # [n, nvec, d] float
    bias: torch.Tensor | None = None  # [n] fc1 bias (ReLU models) or None

    @property
    def num_neurons(self) -> int:
        return self.vectors.shape[0]


class FFNProvider(Protocol):
    """``provider(layer, x)`` -> the neurons to use for ``layer``; x: [B, T, d] is
    the FFN input (post-norm hidden state) so a provider can predict from it.
    A list of B NeuronWeights gives each batch row its own neurons (the worker
    batches sequences that chose different neurons)."""

    def __call__(self, layer: int, x: torch.Tensor) -> NeuronWeights | list[NeuronWeights]: ...


def per_row(ffn):
    """Let ``ffn(x, w)`` take a list of per-row NeuronWeights: row b of x uses w[b]."""

    def apply(x: torch.Tensor, w: NeuronWeights | list[NeuronWeights]) -> torch.Tensor:
        if isinstance(w, NeuronWeights):
            return ffn(x, w)
        assert len(w) == x.shape[0], (len(w), x.shape)
        return torch.cat([ffn(x[b : b + 1], wb) for b, wb in enumerate(w)])

    apply.__doc__ = ffn.__doc__
    return apply


@per_row
def swiglu_ffn(x: torch.Tensor, w: NeuronWeights) -> torch.Tensor:
    """x: [B, T, d] -> [B, T, d] = (silu(x @ gate^T) * (x @ up^T)) @ down."""
    v = w.vectors.to(x.dtype)  # [n, 3, d]
    h = F.silu(x @ v[:, 0].T) * (x @ v[:, 1].T)  # [B, T, n]
    return h @ v[:, 2]


@per_row
def relu_ffn(x: torch.Tensor, w: NeuronWeights) -> torch.Tensor:
    """x: [B, T, d] -> [B, T, d] = relu(x @ fc1^T + b) @ fc2^T (fc2's bias is dense, added by the layer)."""
    v = w.vectors.to(x.dtype)  # [n, 2, d]
    pre = x @ v[:, 0].T  # [B, T, n]
    if w.bias is not None:
        pre = pre + w.bias.to(x.dtype)
    return F.relu(pre) @ v[:, 1]
