"""The quantisers' stated error bound, shared by test_quant and test_convert."""
from __future__ import annotations

import torch

from m2cache.codec import quant

# x / s is rounded to fp32 before round(): allow that last-bit error (|x/s| <= qmax + 1/2),
# i.e. |x - x_hat| <= s/2 + s * qmax * 2**-23.
_REL = 2.0 ** -23


def assert_int8_bound(x: torch.Tensor, x_hat: torch.Tensor) -> None:
    """x [..., d] original, x_hat its INT8 decode: s >= max|x|/127 and |x - x_hat| <= s/2."""
    _, s = quant.quantize_int8(x)
    s = s.double().unsqueeze(-1)  # [..., 1]
    _check(x.double(), x_hat.double(), s, quant.INT8_QMAX)


def assert_int4_bound(x: torch.Tensor, x_hat: torch.Tensor, group: int) -> None:
    """x [..., d] original, x_hat its INT4 decode: per group s >= max|x|/7 and |x - x_hat| <= s/2."""
    *lead, d = x.shape
    _, s = quant.quantize_int4(x, group)
    shape = (*lead, d // group, group)
    _check(x.double().reshape(shape), x_hat.double().reshape(shape), s.double().unsqueeze(-1), quant.INT4_QMAX)


def _check(x: torch.Tensor, x_hat: torch.Tensor, s: torch.Tensor, qmax: int) -> None:
    # x, x_hat: [..., g]; s: [..., 1] float64
    assert torch.isfinite(s).all() and (s > 0).all()
    amax = x.abs().amax(dim=-1, keepdim=True)
    assert (s * qmax >= amax * (1 - _REL)).all(), "scale too small: values would be clipped"
    err = (x - x_hat).abs()
    limit = s / 2 + s * qmax * _REL
    worst = (err - limit).max().item() if err.numel() else 0.0
    assert worst <= 0, f"quantisation error exceeds s/2 by {worst}"
