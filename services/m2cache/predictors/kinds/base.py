"""The interface every predictor kind implements, and the shared helpers."""
from __future__ import annotations

from typing import ClassVar

import torch

from m2cache.errors import InvalidArgument

# Low-rank factors and MLP weights are held in fp16 (their resident form): half
# the bytes of fp32 at no measurable cost in ranking quality.
FACTOR_DTYPE = torch.float16


def mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, a] float32 @ w [a, b] (held in fp16 or fp32) -> [n, b] float32."""
    return x @ w.to(x.dtype)


class LayerPredictor:
    """One layer's scorer. Subclasses set ``kind`` and ``TENSORS`` (required
    tensor names) and hold their tensors as attributes of those names."""

    kind: ClassVar[str] = ""
    TENSORS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def matches(cls, names: set[str]) -> bool:
        return names == set(cls.TENSORS)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Local tensor name -> tensor, in its resident dtype."""
        return {name: getattr(self, name) for name in self.TENSORS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LayerPredictor":
        missing = [n for n in cls.TENSORS if n not in tensors]
        if missing:
            raise InvalidArgument(f"{cls.kind} predictor tensors lack {missing}")
        obj = cls(**{n: tensors[n] for n in cls.TENSORS})
        obj.check()
        return obj

    def check(self) -> None:
        """Raise InvalidArgument if the tensor shapes disagree."""

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, d_model] float32 -> [n, d_ffn] float32; higher = more important."""
        raise NotImplementedError

    @property
    def d_model(self) -> int:
        raise NotImplementedError

    @property
    def d_ffn(self) -> int:
        raise NotImplementedError

    @property
    def rank(self) -> int:
        """The kind's size parameter (rank or hidden width), for reports."""
        raise NotImplementedError

    def num_bytes(self) -> int:
        """Bytes resident in fast memory while the predictor is in use."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def flops_per_token(self) -> int:
        raise NotImplementedError

    def to(self, device) -> "LayerPredictor":
        return type(self)(**{n: t.to(device) for n, t in self.tensors().items()})


def check_shapes(kind: str, *pairs: tuple[str, int, int]) -> None:
    """pairs of (what, got, expected) -> InvalidArgument on the first mismatch."""
    for what, got, want in pairs:
        if got != want:
            raise InvalidArgument(f"{kind} predictor shapes disagree: {what} is {got}, expected {want}")
