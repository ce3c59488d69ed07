"""Predictor tensors as bytes, for the store and the wire (TensorBlob): each
tensor travels in its resident dtype, so what a worker pulls is what it keeps."""
from __future__ import annotations

import torch

from m2cache.errors import InvalidArgument

TENSOR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
                 "int8": torch.int8, "uint8": torch.uint8}
_NAMES = {dt: name for name, dt in TENSOR_DTYPES.items()}


def tensor_to_bytes(t: torch.Tensor) -> tuple[bytes, str]:
    """(raw little-endian bytes, dtype name) of a CPU copy of ``t``."""
    name = _NAMES.get(t.dtype)
    if name is None:
        raise InvalidArgument(f"predictor tensor dtype {t.dtype} unsupported; use one of {', '.join(TENSOR_DTYPES)}")
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return raw, name


def tensor_from_bytes(raw: bytes, dtype: str, shape) -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes`; InvalidArgument on a bad dtype or size."""
    dt = TENSOR_DTYPES.get(dtype or "float32")
    if dt is None:
        raise InvalidArgument(f"predictor tensor dtype {dtype!r} unsupported; use one of {', '.join(TENSOR_DTYPES)}")
    shape = [int(s) for s in shape]
    numel = 1
    for s in shape:
        numel *= s
    if numel * dt.itemsize != len(raw):
        raise InvalidArgument(f"predictor tensor of shape {shape} and dtype {dtype} needs {numel * dt.itemsize} bytes, "
                              f"got {len(raw)}")
    if numel == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(shape)
