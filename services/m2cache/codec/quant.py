"""Symmetric INT8 / INT4 quantisers shared by the converter, the reference
model and the worker, so a neuron decodes to the same floats everywhere.

Error bounds (tested in tests/test_quant.py), with ``s`` the stored fp16 scale:
- INT8, one scale per vector: ``s >= max|x| / 127`` and ``|x - x_hat| <= s / 2``.
- INT4, one scale per group of ``group`` values: ``s >= max|x| / 7`` and
  ``|x - x_hat| <= s / 2`` (codes -7..7 stored as nibbles 1..15).
Scales are rounded *up* to the next fp16 so no value is ever clipped.
"""
from __future__ import annotations

import torch

from m2cache.errors import InvalidArgument

INT8_QMAX = 127
INT4_QMAX = 7
_FP16_TINY = 2.0 ** -24  # smallest positive fp16 subnormal


_FP16_MAX = 65504.0


def _fp16_scale(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """fp16 scale >= amax / qmax (never clips), 1.0 for all-zero vectors."""
    # amax: [...] float32
    exact = amax.float() / qmax
    if exact.numel() and not bool(torch.isfinite(exact).all() and (exact <= _FP16_MAX).all()):
        raise InvalidArgument(f"weights too large (or not finite) for fp16 scales: |w| must stay below {_FP16_MAX * qmax:g}")
    s = exact.to(torch.float16)
    low = s.float() < exact
    s = torch.where(low, torch.nextafter(s, torch.tensor(float("inf"), dtype=torch.float16)), s)
    s = torch.where(amax > 0, s.clamp_min(_FP16_TINY), torch.ones_like(s))
    return s


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., d] -> (q int8 [..., d], scale fp16 [...]) one scale per last-dim vector."""
    xf = x.float()
    scale = _fp16_scale(xf.abs().amax(dim=-1), INT8_QMAX)
    q = torch.round(xf / scale.float().unsqueeze(-1)).clamp_(-INT8_QMAX, INT8_QMAX)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 [..., d], scale fp16 [...] -> float32 [..., d]."""
    return q.float() * scale.float().unsqueeze(-1)


def quantize_int4(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., d] with d % group == 0 -> (codes uint8 [..., d] in 1..15, scale fp16 [..., d/group])."""
    *lead, d = x.shape
    assert d % group == 0, (d, group)
    xg = x.float().reshape(*lead, d // group, group)
    scale = _fp16_scale(xg.abs().amax(dim=-1), INT4_QMAX)
    q = torch.round(xg / scale.float().unsqueeze(-1)).clamp_(-INT4_QMAX, INT4_QMAX)
    return (q + 8).to(torch.uint8).reshape(*lead, d), scale


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """codes uint8 [..., d] in 1..15, scale fp16 [..., d/group] -> float32 [..., d]."""
    *lead, d = codes.shape
    q = codes.to(torch.int16).reshape(*lead, d // group, group) - 8
    return (q.float() * scale.float().unsqueeze(-1)).reshape(*lead, d)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., m] (values < 16) -> uint8 [..., ceil(m/2)], low nibble first."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    lo, hi = codes[..., 0::2], codes[..., 1::2]
    return lo | (hi << 4)


def unpack_nibbles(packed: torch.Tensor, m: int) -> torch.Tensor:
    """uint8 [..., ceil(m/2)] -> codes uint8 [..., m]."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :m]
