"""Kind ``qcopy``: resident low-bit copies of both the gate and the up rows
(1, 2 or 4 bits per weight, one fp16 scale per row), computed exactly per
token: score = |silu(x . gate~_i) * (x . up~_i)|.

Measured (docs/BENCHMARKS.md, "Ranker"): the |up| estimate, not the gate's
precision, limits the gate-copy kinds, so spending the bytes on coarse copies
of both projections ranks better than a fine gate copy alone. 1 bit: sign
times the row's mean |w| (the least-squares scale); 2 bits: levels
(-1.5, -0.5, 0.5, 1.5) * s with s = 0.9957 * rms(row) (the least-squares uniform
4-level step for Gaussian weights); 4 bits: levels -7..7 * max|w| / 7.

Given calibration FFN inputs X, the rows are quantised for what the predictor
computes, x . w, rather than for w itself (GPTQ, Frantar et al. 2022): columns
in order of decreasing E[x_j^2], each column's rounding error pushed onto the
columns not yet rounded through the inverse of H = E[x x^T] (damped by
``DAMP`` x its mean diagonal), then each row's scale refitted by least squares
under H. Same codes, same bytes, same kernel; on SmolLM2's held-out WikiText
the 1-bit copies' top-25% recall rises from 0.50 to 0.60 (docs/BENCHMARKS.md).
Codes are packed little-end first, 8 / bits per byte: gate_codes / up_codes
uint8 [F, ceil(d * bits / 8)], gate_scale / up_scale fp16 [F], bits uint8 [1].
Cost: 2 * bits / 16 of an fp16 FFN's gate+up bytes, i.e. bits/12 of the whole
fp16 FFN (1 bit: 4.2%) and bits/24 of an fp32 one (2 bits: 4.2%); FLOPs 2/3 of
the FFN's, like computing the gate and up projections.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from m2cache.errors import InvalidArgument
from m2cache.model import kernels
from m2cache.predictors.kinds.base import LayerPredictor, check_shapes

BITS = (1, 2, 4)
_STEP2 = 0.9957  # least-squares uniform 4-level step for a unit Gaussian
DAMP = 0.2  # H's damping: 0.2 x mean diag ranked best on held-out SmolLM2 text (0.01-1.0 tried)
_BLOCK = 128  # GPTQ's lazy-update block of columns


def quantize_rows(w: torch.Tensor, bits: int, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [F, d] float -> (codes uint8 [F, ceil(d * bits / 8)], scale fp16 [F]).
    x [N, d]: calibration inputs; given, the codes minimise the error of x . w."""
    if bits not in BITS:
        raise InvalidArgument(f"qcopy supports {BITS} bits, got {bits}")
    w = w.float()
    scale = _initial_scale(w, bits)
    if x is None:
        codes = _round(w, scale, bits)
    else:
        if x.ndim != 2 or x.shape[1] != w.shape[1] or x.shape[0] == 0:
            raise InvalidArgument(f"qcopy calibration inputs must be [N > 0, {w.shape[1]}], got {tuple(x.shape)}")
        h = _hessian(x.float())
        codes = _gptq(w, scale, bits, h)
        scale = _refit_scale(w, _levels(codes, bits), h, scale)
    return _pack(codes, bits), scale.to(torch.float16)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` -> float32 [F, d]."""
    return _levels(_unpack(codes, bits, d), bits) * scale.float()[:, None]


def _initial_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 1:
        return w.abs().mean(-1)
    if bits == 2:
        return _STEP2 * w.pow(2).mean(-1).sqrt()
    return w.abs().amax(-1) / 7


def _round(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes of w [F, k] on the row scales' grids -> uint8 [F, k]."""
    if bits == 1:
        return (w > 0).to(torch.uint8)
    z = w / scale.clamp_min(1e-12)[:, None]
    if bits == 2:
        return torch.floor(z + 2).clamp(0, 3).to(torch.uint8)
    return (torch.round(z).clamp(-7, 7) + 8).to(torch.uint8)


def _levels(codes: torch.Tensor, bits: int) -> torch.Tensor:
    q = codes.float()
    return {1: q * 2 - 1, 2: q - 1.5, 4: q - 8}[bits]


def _hessian(x: torch.Tensor) -> torch.Tensor:
    h = x.T @ x / x.shape[0]
    return h + DAMP * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0])


def _gptq(w: torch.Tensor, scale: torch.Tensor, bits: int, h: torch.Tensor) -> torch.Tensor:
    """Codes [F, d] rounded column by column (largest E[x_j^2] first), each
    column's error spread over the columns still to round (blocked GPTQ)."""
    order = torch.argsort(h.diagonal(), descending=True)
    w, h = w[:, order].clone(), h[order][:, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    step = scale[:, None]
    codes = torch.empty(w.shape, dtype=torch.uint8)
    d = w.shape[1]
    for lo in range(0, d, _BLOCK):
        hi = min(lo + _BLOCK, d)
        blk, err = w[:, lo:hi], torch.empty(w.shape[0], hi - lo)
        for j in range(hi - lo):
            c = _round(blk[:, j : j + 1], scale, bits)
            codes[:, lo + j] = c[:, 0]
            err[:, j] = (blk[:, j] - (_levels(c, bits) * step)[:, 0]) / u[lo + j, lo + j]
            blk[:, j + 1 :] -= err[:, j : j + 1] * u[lo + j, lo + j + 1 : hi]
        w[:, hi:] -= err @ u[lo:hi, hi:]
    return codes[:, torch.argsort(order)]


def _refit_scale(w: torch.Tensor, levels: torch.Tensor, h: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Per row, the s minimising E[(x . (w - s * levels))^2] (fallback where degenerate)."""
    lh = levels @ h
    den = (lh * levels).sum(-1)
    s = (lh * w).sum(-1) / den.clamp_min(1e-30)
    return torch.where((den > 0) & (s > 0), s, fallback)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    f, d = codes.shape
    pad = (-d) % per
    c = F.pad(codes, (0, pad)).reshape(f, -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(packed.shape[0], -1)[:, :d].to(torch.uint8)


@dataclass(slots=True)
class QCopyPredictor(LayerPredictor):
    kind = "qcopy"
    TENSORS = ("gate_codes", "gate_scale", "up_codes", "up_scale", "bits", "width")

    gate_codes: torch.Tensor  # uint8 [F, ceil(d * bits / 8)]
    gate_scale: torch.Tensor  # fp16 [F]
    up_codes: torch.Tensor
    up_scale: torch.Tensor
    bits: torch.Tensor  # uint8 [1]
    width: torch.Tensor  # int32 [1]: d_model (codes are padded to whole bytes)

    @classmethod
    def from_rows(cls, gate: torch.Tensor, up: torch.Tensor, bits: int,
                  x: torch.Tensor | None = None) -> "QCopyPredictor":
        """x [N, d]: the layer's FFN inputs on calibration text (None: nearest rounding)."""
        gc, gs = quantize_rows(gate, bits, x)
        uc, us = quantize_rows(up, bits, x)
        return cls(gc, gs, uc, us, torch.tensor([bits], dtype=torch.uint8),
                   torch.tensor([gate.shape[1]], dtype=torch.int32))

    @property
    def num_bits(self) -> int:
        return int(self.bits[0])

    @property
    def kind_name(self) -> str:
        return f"qcopy{self.num_bits}"

    def check(self) -> None:
        if self.num_bits not in BITS:
            raise InvalidArgument(f"qcopy predictor has {self.num_bits} bits; supported {BITS}")
        cols = -(-self.d_model * self.num_bits // 8)
        check_shapes(self.kind_name, ("gate code cols", self.gate_codes.shape[1], cols),
                     ("up codes", tuple(self.up_codes.shape), tuple(self.gate_codes.shape)),
                     ("gate_scale", self.gate_scale.shape[0], self.gate_codes.shape[0]),
                     ("up_scale", self.up_scale.shape[0], self.gate_codes.shape[0]))

    @property
    def d_model(self) -> int:
        return int(self.width[0])

    @property
    def d_ffn(self) -> int:
        return self.gate_codes.shape[0]

    @property
    def rank(self) -> int:
        return self.num_bits

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        d, b = self.d_model, self.num_bits
        # the C kernel reads the packed codes in place (int8-rounded input, like the FFN kernel)
        fast = kernels.qcopy_scores(x.reshape(-1, d), self.gate_codes, self.gate_scale, self.up_codes,
                                    self.up_scale, b)
        if fast is not None:
            return fast.reshape(*x.shape[:-1], self.d_ffn)
        g = x @ dequantize_rows(self.gate_codes, self.gate_scale, b, d).to(x.dtype).T  # [n, F]
        u = x @ dequantize_rows(self.up_codes, self.up_scale, b, d).to(x.dtype).T
        return (F.silu(g) * u).abs()

    def flops_per_token(self) -> int:
        return 4 * self.d_model * self.d_ffn + 6 * self.d_ffn

    @staticmethod
    def bytes_for(d: int, f: int, bits: int) -> int:
        return 2 * (f * -(-d * bits // 8) + 2 * f) + 5
