"""Predictor kinds: what scores a layer's neurons for a token.

Every kind is a small class with the same interface (:class:`base.LayerPredictor`):
``scores(x [n, d]) -> [n, F]`` (only ever ranked), ``tensors()`` / ``from_tensors``
(its named tensors, the store and wire form), ``num_bytes()`` (resident bytes)
and ``flops_per_token()``. A kind is recognised by the exact set of its tensor
names, so stores and the GetPredictor RPC need no extra tag (old stores'
``a``/``b``/``bias`` low-rank predictors load as kind ``lowrank``).

- ``gateup``  (SwiGLU) low-rank approximations of the gate and up projections,
  scored as the activation they imply, |silu(g~) * u~|;
- ``fc1``     (ReLU / OPT) a low-rank approximation of fc1 plus its bias: the
  pre-activation, whose sign says whether the neuron fires at all;
- ``mlp``     a two-layer MLP (Deja Vu) fitted to the standardised log-magnitudes;
- ``gatecopy8`` / ``gatecopy4`` a resident INT8 / INT4 copy of the gate rows
  (computed exactly, CATS/TEAL-style) times a low-rank |up| estimate;
- ``qcopy``   resident 1/2/4-bit copies of both gate and up rows (qcopy.py);
- ``lowrank`` the original linear map to standardised log-magnitudes.
"""
from __future__ import annotations

from m2cache.errors import InvalidArgument
from m2cache.predictors.kinds.base import LayerPredictor
from m2cache.predictors.kinds.gatecopy import GateCopyPredictor
from m2cache.predictors.kinds.gateup import Fc1Predictor, GateUpPredictor
from m2cache.predictors.kinds.lowrank import LowRankPredictor
from m2cache.predictors.kinds.mlp import MLPPredictor
from m2cache.predictors.kinds.qcopy import QCopyPredictor

KINDS: dict[str, type] = {
    "gateup": GateUpPredictor,
    "fc1": Fc1Predictor,
    "mlp": MLPPredictor,
    "gatecopy8": GateCopyPredictor,
    "gatecopy4": GateCopyPredictor,
    "qcopy": QCopyPredictor,
    "lowrank": LowRankPredictor,
}


def kind_of(names: set[str]) -> type:
    """The kind class whose tensor names are exactly ``names``."""
    for cls in (GateUpPredictor, Fc1Predictor, MLPPredictor, GateCopyPredictor, QCopyPredictor, LowRankPredictor):
        if cls.matches(names):
            return cls
    raise InvalidArgument(f"no predictor kind has the tensors {sorted(names)}")


def check_kind(kind: str, ffn_kind: str) -> str:
    """Validate a kind name for a model's FFN kind ("swiglu" | "relu")."""
    if kind not in KINDS:
        raise InvalidArgument(f"unknown predictor kind {kind!r}; expected one of {', '.join(KINDS)}")
    swiglu_only, relu_only = {"gateup", "gatecopy8", "gatecopy4", "qcopy"}, {"fc1"}
    if (ffn_kind == "relu" and kind in swiglu_only) or (ffn_kind == "swiglu" and kind in relu_only):
        raise InvalidArgument(f"predictor kind {kind!r} does not fit a {ffn_kind} FFN")
    return kind


__all__ = ["KINDS", "LayerPredictor", "GateUpPredictor", "Fc1Predictor", "MLPPredictor", "GateCopyPredictor",
           "LowRankPredictor", "QCopyPredictor", "kind_of", "check_kind"]
