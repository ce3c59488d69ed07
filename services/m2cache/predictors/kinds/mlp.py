"""Kind ``mlp``: a two-layer MLP per layer (Deja Vu), fitted to each token's
standardised log-magnitudes: scores = relu(x @ w1 + b1) @ w2 + b2, with
w1 [d, h], b1 [h], w2 [h, F], b2 [F] held in fp16."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from m2cache.predictors.kinds.base import LayerPredictor, check_shapes, mm


@dataclass(slots=True)
class MLPPredictor(LayerPredictor):
    kind = "mlp"
    TENSORS = ("w1", "b1", "w2", "b2")

    w1: torch.Tensor  # [d, h]
    b1: torch.Tensor  # [h]
    w2: torch.Tensor  # [h, F]
    b2: torch.Tensor  # [F]

    def check(self) -> None:
        check_shapes(self.kind, ("b1", self.b1.shape[0], self.w1.shape[1]), ("w2 rows", self.w2.shape[0], self.w1.shape[1]),
                     ("b2", self.b2.shape[0], self.w2.shape[1]))

    @property
    def d_model(self) -> int:
        return self.w1.shape[0]

    @property
    def d_ffn(self) -> int:
        return self.w2.shape[1]

    @property
    def rank(self) -> int:
        return self.w1.shape[1]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(mm(x, self.w1) + self.b1.to(x.dtype))  # [n, h]
        return mm(h, self.w2) + self.b2.to(x.dtype)

    def flops_per_token(self) -> int:
        return 2 * self.rank * (self.d_model + self.d_ffn) + 2 * self.rank + self.d_ffn

    @staticmethod
    def bytes_for(d: int, f: int, rank: int) -> int:
        return 2 * (rank * (d + f + 1) + f)
