"""Kinds ``gatecopy8`` / ``gatecopy4``: a resident low-precision copy of the
layer's gate rows, computed exactly per token (CATS / TEAL use the gate alone),
times a cheap low-rank estimate of |up|: score = |silu(x . gate_i)| * |u~_i|.

Tensors: ``gate_q8`` int8 [F, d] with ``gate_scale`` fp16 [F] (one scale per
row), or ``gate_q4`` uint8 [F, d/2] (two codes per byte) with ``gate_scale``
fp16 [F, d/group]; ``up_a`` [d, r], ``up_b`` [r, F] in fp16, and ``up_abs`` fp16 [F], each neuron's
mean |up| on the calibration text (the |up| estimate when r = 0). The quantisers are
the store's own (codec/quant.py), so INT8 gate rows are exactly the store's
INT8 records' gate part. On an fp16 model the INT4 copy alone is ~8% and the
INT8 copy ~17% of the layer's FFN bytes: over a 5% budget by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from m2cache.codec import quant
from m2cache.predictors.kinds.base import LayerPredictor, check_shapes, mm

INT4_GROUP = 32


@dataclass(slots=True)
class GateCopyPredictor(LayerPredictor):
    kind = "gatecopy"
    TENSORS = ("gate_q", "gate_scale", "up_a", "up_b", "up_abs")  # gate_q stands for gate_q8 | gate_q4

    gate_q: torch.Tensor  # int8 [F, d] (INT8) or uint8 [F, d/2] packed nibbles (INT4)
    gate_scale: torch.Tensor  # fp16 [F] (INT8) or [F, d/group] (INT4)
    up_a: torch.Tensor  # [d, r]
    up_b: torch.Tensor  # [r, F]
    up_abs: torch.Tensor  # [F] mean |up| per neuron
    bits: int = 8

    @classmethod
    def matches(cls, names: set[str]) -> bool:
        rest = {"gate_scale", "up_a", "up_b", "up_abs"}
        return names in (rest | {"gate_q8"}, rest | {"gate_q4"})

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "GateCopyPredictor":
        bits = 8 if "gate_q8" in tensors else 4
        obj = cls(tensors[f"gate_q{bits}"], tensors["gate_scale"], tensors["up_a"], tensors["up_b"], tensors["up_abs"], bits)
        obj.check()
        return obj

    @classmethod
    def from_gate(cls, gate: torch.Tensor, up_a: torch.Tensor, up_b: torch.Tensor, up_abs: torch.Tensor,
                  bits: int) -> "GateCopyPredictor":
        """Quantise gate rows [F, d] float to ``bits`` (8 or 4)."""
        if bits == 8:
            q, scale = quant.quantize_int8(gate)
        else:
            codes, scale = quant.quantize_int4(gate, INT4_GROUP if gate.shape[1] % INT4_GROUP == 0 else gate.shape[1])
            q = quant.pack_nibbles(codes)
        return cls(q, scale, up_a, up_b, up_abs, bits)

    @property
    def kind_name(self) -> str:
        return f"gatecopy{self.bits}"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"gate_q{self.bits}": self.gate_q, "gate_scale": self.gate_scale, "up_a": self.up_a, "up_b": self.up_b,
                "up_abs": self.up_abs}

    def check(self) -> None:
        f, d = self.up_b.shape[1], self.up_a.shape[0]
        cols = d if self.bits == 8 else (d + 1) // 2
        check_shapes(self.kind_name, ("up_abs", self.up_abs.shape[0], f), ("gate rows", self.gate_q.shape[0], f), ("gate cols", self.gate_q.shape[1], cols),
                     ("up_b rows", self.up_b.shape[0], self.up_a.shape[1]))

    @property
    def d_model(self) -> int:
        return self.up_a.shape[0]

    @property
    def d_ffn(self) -> int:
        return self.up_b.shape[1]

    @property
    def rank(self) -> int:
        return self.up_a.shape[1]

    def gate(self) -> torch.Tensor:
        """Dequantised gate rows [F, d] float32."""
        if self.bits == 8:
            return quant.dequantize_int8(self.gate_q, self.gate_scale)
        group = self.d_model // self.gate_scale.shape[1]  # INT4_GROUP, or the whole row if d is not a multiple
        return quant.dequantize_int4(quant.unpack_nibbles(self.gate_q, self.d_model), self.gate_scale, group)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        g = x @ self.gate().to(x.dtype).T  # [n, F]
        if self.rank == 0:
            return F.silu(g).abs() * self.up_abs.to(x.dtype)
        return (F.silu(g) * mm(mm(x, self.up_a), self.up_b)).abs()

    def flops_per_token(self) -> int:
        d, f = self.d_model, self.d_ffn
        return 2 * d * f + 2 * self.rank * (d + f) + 6 * f

    def to(self, device) -> "GateCopyPredictor":
        return GateCopyPredictor(self.gate_q.to(device), self.gate_scale.to(device), self.up_a.to(device),
                                 self.up_b.to(device), self.up_abs.to(device), self.bits)

    @staticmethod
    def bytes_for(d: int, f: int, rank: int, bits: int = 8) -> int:
        gate = d * f + 2 * f if bits == 8 else f * ((d + 1) // 2) + 2 * f * (d // INT4_GROUP)
        return gate + 2 * rank * (d + f) + 2 * f
