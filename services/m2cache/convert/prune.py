"""Unstructured pruning of FFN neurons at conversion (Endor's bitmap format pays
off only on sparse weights).

Each neuron vector (codec/format.py: the gate and up rows and the down column of
SwiGLU; the fc1 row and fc2 column of ReLU) is pruned on its own: the
``floor(sparsity * d_model)`` lowest-scoring elements become exactly zero, so
every neuron record has the same sparsity and the same bitmap size.

- magnitude: score = |W_ij|.
- wanda (Sun et al., 2023): score = |W_ij| * ||X_j||, X_j the j-th feature of
  the FFN input over calibration tokens. It applies to the input-side vectors
  (gate/up rows, fc1 row), whose elements multiply different input features;
  the output column of a neuron multiplies a single activation h_i, so within
  that vector Wanda's ordering is the magnitude ordering and it is pruned by
  magnitude.

Dense tensors (attention, embeddings, norms, head) are never pruned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from m2cache.errors import InvalidArgument

METHODS = ("magnitude", "wanda")


@dataclass(frozen=True, slots=True)
class PruneSpec:
    """What ``m2cache convert --prune`` asked for; validated on construction."""

    sparsity: float
    method: str = "magnitude"
    text: str | None = None  # calibration text file (wanda)
    max_tokens: int = 65536  # calibration tokens used at most
    context: int = 256  # tokens per calibration sequence

    def __post_init__(self) -> None:
        if not (isinstance(self.sparsity, (int, float)) and math.isfinite(self.sparsity)
                and 0.0 <= self.sparsity < 1.0):
            raise InvalidArgument(f"--prune sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.method not in METHODS:
            raise InvalidArgument(f"unknown --prune-method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "wanda" and not self.text:
            raise InvalidArgument("--prune-method wanda needs calibration text: pass --text FILE")
        if self.text and not Path(self.text).is_file():
            raise InvalidArgument(f"calibration text {self.text} is not a readable file")
        if self.max_tokens < 2 or self.context < 2:
            raise InvalidArgument("calibration max_tokens and context must be >= 2")

    def to_manifest(self) -> dict:
        """The manifest's record of the pruning."""
        out = {"method": self.method, "sparsity": self.sparsity}
        if self.method == "wanda":
            out["calibration"] = {"text": str(Path(self.text).name), "max_tokens": self.max_tokens,
                                  "context": self.context}
        return out


def prune_vectors(vectors: torch.Tensor, sparsity: float, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """vectors [F, nvec, d] -> a copy with the lowest-scoring ``floor(sparsity * d)``
    elements of every vector set to zero. ``input_norm`` [d] (Wanda) scales the
    scores of the input-side vectors ``[:, :-1]``; None is magnitude pruning."""
    num, nvec, d = vectors.shape
    k = int(math.floor(sparsity * d))
    out = vectors.clone()
    if k == 0:
        return out
    score = vectors.float().abs()  # [F, nvec, d]
    if input_norm is not None:
        assert input_norm.shape == (d,), (input_norm.shape, d)
        score[:, :-1] *= input_norm.float()
    drop = torch.argsort(score, dim=-1, stable=True)[..., :k]  # [F, nvec, k] lowest scores
    out.scatter_(-1, drop, torch.zeros((), dtype=out.dtype).expand(drop.shape))
    return out
