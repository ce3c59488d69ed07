"""Kinds ``gateup`` (SwiGLU) and ``fc1`` (ReLU): low-rank approximations of the
FFN's own input projections, so the score is the activation they imply.

SwiGLU: g~ = (x @ gate_a) @ gate_b, u~ = (x @ up_a) @ up_b, score = |silu(g~) * u~|.
A neuron is large when silu(g) and u are both large in magnitude; modelling
both projections (not one map to |activation|) lets the predictor see the
signs. ReLU (OPT): score = (x @ fc1_a) @ fc1_b + fc1_bias, the pre-activation
estimate: its sign says whether the neuron fires, its size how strongly.
Initialised from the activation-whitened truncated SVD of the layer's weights
(fit.py), then fitted on calibration activations (train.py).
Factors are held in fp16: gate_a [d, rg], gate_b [rg, F], up_a [d, ru], up_b [ru, F].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from m2cache.predictors.kinds.base import LayerPredictor, check_shapes, mm


@dataclass(slots=True)
class GateUpPredictor(LayerPredictor):
    kind = "gateup"
    TENSORS = ("gate_a", "gate_b", "up_a", "up_b")

    gate_a: torch.Tensor  # [d, rg]
    gate_b: torch.Tensor  # [rg, F]
    up_a: torch.Tensor  # [d, ru]
    up_b: torch.Tensor  # [ru, F]

    def check(self) -> None:
        check_shapes(self.kind, ("gate_b rows", self.gate_b.shape[0], self.gate_a.shape[1]),
                     ("up_b rows", self.up_b.shape[0], self.up_a.shape[1]),
                     ("up_a rows", self.up_a.shape[0], self.gate_a.shape[0]),
                     ("up_b cols", self.up_b.shape[1], self.gate_b.shape[1]))

    @property
    def d_model(self) -> int:
        return self.gate_a.shape[0]

    @property
    def d_ffn(self) -> int:
        return self.gate_b.shape[1]

    @property
    def rank(self) -> int:
        return self.gate_a.shape[1]

    def pre_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, d] -> (g~, u~) each [n, F]."""
        return mm(mm(x, self.gate_a), self.gate_b), mm(mm(x, self.up_a), self.up_b)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.pre_activations(x)
        return (F.silu(g) * u).abs()

    def flops_per_token(self) -> int:
        d, f = self.d_model, self.d_ffn
        return 2 * (self.gate_a.shape[1] + self.up_a.shape[1]) * (d + f) + 6 * f

    @staticmethod
    def bytes_for(d: int, f: int, rank: int) -> int:
        return 2 * 2 * rank * (d + f)


@dataclass(slots=True)
class Fc1Predictor(LayerPredictor):
    kind = "fc1"
    TENSORS = ("fc1_a", "fc1_b", "fc1_bias")

    fc1_a: torch.Tensor  # [d, r]
    fc1_b: torch.Tensor  # [r, F]
    fc1_bias: torch.Tensor  # [F] the layer's own fc1 bias

    def check(self) -> None:
        check_shapes(self.kind, ("fc1_b rows", self.fc1_b.shape[0], self.fc1_a.shape[1]),
                     ("fc1_bias", self.fc1_bias.shape[0], self.fc1_b.shape[1]))

    @property
    def d_model(self) -> int:
        return self.fc1_a.shape[0]

    @property
    def d_ffn(self) -> int:
        return self.fc1_b.shape[1]

    @property
    def rank(self) -> int:
        return self.fc1_a.shape[1]

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return mm(mm(x, self.fc1_a), self.fc1_b) + self.fc1_bias.to(x.dtype)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x)

    def flops_per_token(self) -> int:
        return 2 * self.rank * (self.d_model + self.d_ffn) + self.d_ffn

    @staticmethod
    def bytes_for(d: int, f: int, rank: int) -> int:
        return 2 * (rank * (d + f) + f)
