"""Importance scores -> precision bands (FULL / INT8 / INT4 / skipped).

Single row: neurons sorted by score; the top ``round(full * n)`` go to FULL, the
next ones to INT8, then INT4; the rest are skipped. Band edges are cumulative
roundings (``round((full + int8) * n)`` etc.), so band sizes never add up to
more than ``round((full + int8 + int4) * n)`` and the byte budget of the ratios
is met to within one neuron's rounding.

Batch (several rows: sequences, or tokens of one step): one set of bands shared
by every row, sized exactly as for a single row, so the batch costs the same
bytes as one token. The rows are merged by *rank aggregation*: each row's
scores become percentiles (1.0 = that row's most important neuron, so scales of
different rows never matter), and neurons are ordered by their best percentile
over the rows (a neuron one row needs most ranks high even if others ignore it),
ties broken by the mean percentile. With one row this is exactly the
single-row ranking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from m2cache.codec.format import Precision, RecordLayout
from m2cache.errors import InvalidArgument
from m2cache.model import kernels

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class BandRatios:
    """Fractions of a layer's neurons kept in FULL, INT8 and INT4."""

    full: float
    int8: float
    int4: float

    def __post_init__(self):
        for name in ("full", "int8", "int4"):
            v = getattr(self, name)
            if not (v == v) or v < 0 or v > 1:  # v == v rejects NaN
                raise InvalidArgument(f"band ratio {name}={v!r} must lie in [0, 1]")
        if self.kept > 1 + _EPS:
            raise InvalidArgument(
                f"band ratios full={self.full:g} + int8={self.int8:g} + int4={self.int4:g} = {self.kept:g} exceed 1 (100%)"
            )

    @property
    def kept(self) -> float:
        return self.full + self.int8 + self.int4

    def byte_fraction(self, layout: RecordLayout) -> float:
        """Bytes of the kept neurons as a fraction of the layer's FULL bytes."""
        full = layout.num_bytes(Precision.FULL)
        return (self.full * full + self.int8 * layout.num_bytes(Precision.INT8)
                + self.int4 * layout.num_bytes(Precision.INT4)) / full

    def counts(self, num_neurons: int) -> tuple[int, int, int]:
        """Band sizes for a layer of ``num_neurons``, by cumulative rounding."""
        e1 = round(self.full * num_neurons)
        e2 = max(e1, round((self.full + self.int8) * num_neurons))
        e3 = min(num_neurons, max(e2, round(self.kept * num_neurons)))
        return e1, e2 - e1, e3 - e2

    def to_dict(self) -> dict:
        return {"full": self.full, "int8": self.int8, "int4": self.int4}

    @classmethod
    def from_dict(cls, d: dict) -> "BandRatios":
        return cls(float(d["full"]), float(d["int8"]), float(d["int4"]))


@dataclass(frozen=True, slots=True)
class PrecisionBands:
    """Disjoint neuron id sets of one layer, each sorted ascending (LongTensor)."""

    full_ids: torch.Tensor
    int8_ids: torch.Tensor
    int4_ids: torch.Tensor

    def as_choice(self) -> dict[Precision, torch.Tensor]:
        """The form the model's ChoiceProvider takes."""
        return {Precision.FULL: self.full_ids, Precision.INT8: self.int8_ids, Precision.INT4: self.int4_ids}

    def num_bytes(self, layout: RecordLayout) -> int:
        return sum(ids.numel() * layout.num_bytes(p) for p, ids in self.as_choice().items())

    @property
    def num_kept(self) -> int:
        return self.full_ids.numel() + self.int8_ids.numel() + self.int4_ids.numel()


def row_percentiles(scores: torch.Tensor) -> torch.Tensor:
    """scores [R, n] -> percentiles [R, n] in (0, 1]; 1.0 = the row's best neuron."""
    n = scores.shape[-1]
    order = scores.argsort(dim=-1, descending=True, stable=True)  # [R, n]
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    return 1.0 - ranks.float() / n


def aggregate_order(scores: torch.Tensor) -> torch.Tensor:
    """scores [n] or [R, n] -> neuron ids [n], most important first (see module doc)."""
    if scores.dim() == 1:
        return scores.argsort(descending=True, stable=True)
    if scores.shape[0] == 1:
        return scores[0].argsort(descending=True, stable=True)
    pct = row_percentiles(scores)  # [R, n]
    # Lexicographic (max, mean): sort by the tie-breaker first, then stably by the key.
    by_mean = pct.mean(dim=0).argsort(descending=True, stable=True)
    best = pct.amax(dim=0)[by_mean]
    return by_mean[best.argsort(descending=True, stable=True)]


def assign_bands(scores: torch.Tensor, ratios: BandRatios) -> PrecisionBands:
    """scores [n] or [R, n] (higher = more important) -> bands of the n neurons."""
    if scores.dim() not in (1, 2) or scores.shape[-1] == 0:
        raise InvalidArgument(f"scores must be [n] or [rows, n] with n > 0, got shape {tuple(scores.shape)}")
    if scores.dim() == 1 or scores.shape[0] == 1:
        return _bands_of_one_row(scores.reshape(-1).float(), ratios)
    order = aggregate_order(scores.float())
    n_full, n_int8, n_int4 = ratios.counts(order.numel())
    e1, e2 = n_full, n_full + n_int8
    return PrecisionBands(
        full_ids=order[:e1].sort().values,
        int8_ids=order[e1:e2].sort().values,
        int4_ids=order[e2 : e2 + n_int4].sort().values,
    )


def _bands_of_one_row(scores: torch.Tensor, ratios: BandRatios) -> PrecisionBands:
    """One row (the decode path, every layer of every token): nested selection instead
    of a full sort (the C kernel on CPU, nested unsorted top-k elsewhere); the same
    bands as sorting up to the order of exactly tied scores at a band edge."""
    n_full, n_int8, n_int4 = ratios.counts(scores.numel())
    e1, e2, e3 = n_full, n_full + n_int8, n_full + n_int8 + n_int4
    fast = kernels.select_bands(scores, e1, e2, e3)
    if fast is not None:
        return PrecisionBands(*fast)
    kept_vals, kept = scores.topk(e3, sorted=False)
    top_vals, pos = kept_vals.topk(e2, sorted=False)
    top = kept[pos]
    full = top[top_vals.topk(e1, sorted=False).indices]
    band = torch.zeros(scores.numel(), dtype=torch.int8, device=scores.device)
    band[kept], band[top], band[full] = 3, 2, 1
    return PrecisionBands(full_ids=(band == 1).nonzero().flatten(), int8_ids=(band == 2).nonzero().flatten(),
                          int4_ids=(band == 3).nonzero().flatten())


def full_only(keep: float) -> BandRatios:
    """All kept neurons in FULL (the no-mixed-precision baseline)."""
    return BandRatios(keep, 0.0, 0.0)
