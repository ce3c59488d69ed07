"""The FFN. A layer's FFN is a sum over neurons (codec/format.py: SwiGLU neurons
are [gate row, up row, down column]; ReLU/OPT neurons [fc1 row, fc2 column] plus
the fc1 bias). Three ways to compute it, all pure tensor code:

- ``DenseFFN``: every neuron at full precision as fused matrices in the compute
  dtype (gate and up stacked into one [2F, d] matrix, down as [d, F]): the dense
  path, used when everything is resident and nothing is skipped;
- ``sparse_ffn(h, bands, layout)``: the neurons of precision ``Band``s, computed
  straight from their stored records wherever they live (kernels/);
- ``vectors_ffn(h, vectors, bias, kind)``: from decoded float vectors (training,
  calibration; not on the serving path).

An FFN provider is a callable ``ffn(layer, h) -> y``: h [B, T, d] is the layer's
FFN input (the normed hidden state), y [B, T, d] its output in h's dtype (OPT's
dense fc2 bias is added by the model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from m2cache.codec.format import Precision, RecordLayout
from m2cache.model import kernels


class FFNProvider(Protocol):
    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor: ...


@dataclass(slots=True)
class Band:
    """The neurons ``ids`` (ascending) of one precision a layer computes with:
    neuron ids[k]'s record is row ``rows[k]`` of ``tables[which[k]]`` (``which``
    None: all in ``tables[0]``). ``mask`` [R, n]: weight of neuron k for input row r
    (0 = that row did not choose it); None = every row uses every neuron."""

    prec: Precision
    ids: torch.Tensor  # [n] long, ascending
    tables: tuple[torch.Tensor, ...]  # uint8 [*, record_bytes] each
    rows: torch.Tensor  # [n] long
    which: torch.Tensor | None = None  # [n] long index into tables
    mask: torch.Tensor | None = None  # [R, n] float

    @property
    def num_neurons(self) -> int:
        return int(self.rows.numel())

    def gather(self) -> torch.Tensor:
        """[n, record_bytes] copy of the records (torch fallback)."""
        if self.which is None:
            return self.tables[0][self.rows.to(self.tables[0].device)]
        out = torch.empty((self.num_neurons, self.tables[0].shape[1]), dtype=torch.uint8, device=self.tables[0].device)
        for i, table in enumerate(self.tables):
            sel = (self.which == i).to(table.device)
            out[sel] = table[self.rows.to(table.device)[sel]]
        return out


def sparse_ffn(h: torch.Tensor, bands: list[Band], layout: RecordLayout, num_neurons: int) -> torch.Tensor:
    """h [B, T, d] -> y [B, T, d] over the bands' neurons (masks index rows of B*T) of a
    layer of ``num_neurons``."""
    B, T, d = h.shape
    y = kernels.neuron_ffn(h.reshape(B * T, d), bands, layout, num_neurons)  # [B*T, d] float32
    return y.reshape(B, T, d).to(h.dtype)


@dataclass(slots=True)
class DenseFFN:
    """One layer's neurons at full precision, fused for the compute dtype."""

    w_in: torch.Tensor  # SwiGLU [2F, d] (gate rows then up rows); ReLU [F, d] (fc1)
    w_out: torch.Tensor  # [d, F] (down / fc2)
    relu: bool = False
    bias: torch.Tensor | None = None  # [F] fc1 bias (ReLU)

    @classmethod
    def from_vectors(cls, vectors: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "DenseFFN":
        """vectors [F, nvec, d] (float) -> fused matrices in ``dtype``."""
        w_in = vectors[:, :-1].transpose(0, 1).reshape(-1, vectors.shape[-1])  # [(nvec-1)*F, d]
        return cls(w_in.to(dtype).contiguous(), vectors[:, -1].T.to(dtype).contiguous(), vectors.shape[1] == 2,
                   None if bias is None else bias.to(dtype))

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_in, self.w_out, self.bias) if t is not None)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, d] -> [B, T, d] (a lone decode token on CPU: one C call, the same arithmetic)."""
        y = kernels.dense_ffn(h, self.w_in, self.bias, self.w_out, self.relu)
        if y is not None:
            return y
        pre = F.linear(h, self.w_in, self.bias)
        if self.relu:
            return F.linear(F.relu(pre), self.w_out)
        gate, up = pre.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_out)


def vectors_ffn(h: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor | None, ffn_kind: str) -> torch.Tensor:
    """h [B, T, d], vectors [n, nvec, d] float (+ bias [n]) -> [B, T, d] (training / calibration)."""
    v = vectors.to(h.dtype)
    if ffn_kind == "swiglu":
        return (F.silu(h @ v[:, 0].T) * (h @ v[:, 1].T)) @ v[:, 2]
    pre = h @ v[:, 0].T
    if bias is not None:
        pre = pre + bias.to(h.dtype)
    return F.relu(pre) @ v[:, 1]
