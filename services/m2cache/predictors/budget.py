"""Predictor cost against the layer's FFN, and sizing a kind to a byte budget.

A layer's FFN per token, dense at FULL precision: bytes = F * (FULL record
bytes) (the gate, up and down rows in the checkpoint's dtype), FLOPs =
2 * nvec_in * d * F + 2 * d * F (input projections + output projection). A
predictor reads every resident byte of its own each token, so its bytes per
token are its ``num_bytes()``.
"""
from __future__ import annotations

from m2cache.codec.format import Precision, RecordLayout
from m2cache.errors import InvalidArgument
from m2cache.predictors.kinds import KINDS, check_kind

DEFAULT_COST = 0.05  # predictor bytes per token as a fraction of the layer's FFN bytes
# The kind the default ("auto") picks for SwiGLU models, in order of preference at
# equal cost (docs/BENCHMARKS.md, "Ranker": measured side by side): an INT4 gate copy
# where it fits the budget with room for an |up| estimate, else low-rank gate + up.
AUTO_SWIGLU = ("qcopy", "gatecopy4", "gateup")


def ffn_bytes(layout: RecordLayout, d_ffn: int) -> int:
    return d_ffn * layout.num_bytes(Precision.FULL)


def ffn_flops(d_model: int, d_ffn: int, ffn_kind: str) -> int:
    return 2 * d_model * d_ffn * (3 if ffn_kind == "swiglu" else 2)


def bytes_for(kind: str, d: int, f: int, rank: int) -> int:
    if kind.startswith("gatecopy"):
        return KINDS[kind].bytes_for(d, f, rank, int(kind[-1]))
    return KINDS[kind].bytes_for(d, f, rank)


def largest_rank(kind: str, d: int, f: int, budget_bytes: float) -> int:
    """Largest rank (hidden width; bits for qcopy) whose predictor fits ``budget_bytes``; -1 if none."""
    if kind == "qcopy":
        fits = [b for b in (1, 2, 4) if bytes_for(kind, d, f, b) <= budget_bytes]
        return max(fits) if fits else -1
    lo = 0 if kind.startswith("gatecopy") else 1
    if bytes_for(kind, d, f, lo) > budget_bytes:
        return -1
    hi = min(d, f)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bytes_for(kind, d, f, mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def choose_kind(kind: str, ffn_kind: str, d: int, f: int, budget_bytes: float) -> tuple[str, int]:
    """(kind, rank) for a requested kind ("auto" = the measured best that fits)."""
    if kind == "auto":
        if ffn_kind == "relu":
            kind = "fc1"
        else:
            # gatecopy4 only with at least a rank-d/16 |up| estimate beside the gate copy
            fits = [k for k in AUTO_SWIGLU if largest_rank(k, d, f, budget_bytes) >= 1]
            kind = fits[0] if fits else "gateup"
    check_kind(kind, ffn_kind)
    rank = largest_rank(kind, d, f, budget_bytes)
    if rank < (0 if kind.startswith("gatecopy") else 1):
        raise InvalidArgument(f"a {kind} predictor does not fit {budget_bytes:.0f} bytes per layer; raise --cost")
    return kind, rank
