"""Kind ``lowrank``: the original linear low-rank map x -> standardised
log-magnitudes, ``scores = (x @ a) @ b + bias`` with a [d, r], b [r, F],
bias [F] (float32, as older stores hold it). It cannot see the sign of ``up``,
which |silu(gate) * up| discards, so it ranks far below the other kinds
(docs/BENCHMARKS.md, "Ranker"); kept so old stores keep working."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from m2cache.predictors.kinds.base import LayerPredictor, check_shapes, mm


@dataclass(slots=True)
class LowRankPredictor(LayerPredictor):
    kind = "lowrank"
    TENSORS = ("a", "b", "bias")

    a: torch.Tensor  # [d_model, r]
    b: torch.Tensor  # [r, d_ffn]
    bias: torch.Tensor  # [d_ffn]

    def check(self) -> None:
        check_shapes(self.kind, ("b rows", self.b.shape[0], self.a.shape[1]), ("bias", self.bias.shape[0], self.b.shape[1]))

    @property
    def d_model(self) -> int:
        return self.a.shape[0]

    @property
    def d_ffn(self) -> int:
        return self.b.shape[1]

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return mm(mm(x, self.a), self.b) + self.bias.to(x.dtype)

    def flops_per_token(self) -> int:
        return 2 * self.rank * (self.d_model + self.d_ffn) + self.d_ffn

    @staticmethod
    def bytes_for(d: int, f: int, rank: int) -> int:
        return 4 * (rank * (d + f) + f)
