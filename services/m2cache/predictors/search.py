"""Offline band-ratio search (M2Cache Algorithm 1).

Given a byte budget per layer, F = fraction of the layer's FULL bytes, sweep the
FULL and INT8 fractions (a, b) on a grid of ``step``; the INT4 fraction c then
takes whatever budget is left, ``c = min(1 - a - b, (F - a - b*r8) / r4)`` with
r8, r4 the INT8 / INT4 record sizes relative to FULL (so no byte of the budget
is wasted). Every candidate is scored on calibration text with the trained
predictor choosing the bands token by token; the lowest score wins:
- objective "ppl": perplexity of the calibration text (default: it measures
  quality directly, the text is at hand);
- objective "entropy": mean entropy of the model's own predictions, the
  uncertainty estimate of the paper (no labels needed).
The winner is stored as the policy (storage.save_policy) and becomes the
workers' default ratios.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from m2cache.codec.format import Precision, RecordLayout
from m2cache.errors import InvalidArgument
from m2cache.predictors.bands import BandRatios
from m2cache.predictors.evaluate import StepScore

log = logging.getLogger(__name__)

OBJECTIVES = ("ppl", "entropy")
POLICY_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Candidate:
    ratios: BandRatios
    score: float
    perplexity: float
    entropy: float


def _floor(x: float, quantum: float) -> float:
    return max(0.0, int(x / quantum + 1e-9) * quantum)


def candidates(budget: float, layout: RecordLayout, num_neurons: int, step: float = 0.1) -> list[BandRatios]:
    """Every (a, b) on the grid that fits ``budget``, c filling the rest (see module doc)."""
    if not 0 < budget <= 1:
        raise InvalidArgument(f"budget must be a fraction of the layer's FULL bytes in (0, 1], got {budget}")
    if not 0 < step <= 1:
        raise InvalidArgument(f"grid step must be in (0, 1], got {step}")
    full = layout.num_bytes(Precision.FULL)
    r8, r4 = layout.num_bytes(Precision.INT8) / full, layout.num_bytes(Precision.INT4) / full
    grid = [round(i * step, 10) for i in range(int(1 / step + 1e-9) + 1)]
    out = []
    for a in (g for g in grid if g <= budget + 1e-9):
        for b in (g for g in grid if a + g <= 1 + 1e-9 and a + g * r8 <= budget + 1e-9):
            c = min(1.0 - a - b, (budget - a - b * r8) / r4)
            out.append(BandRatios(a, b, _floor(c, 1.0 / num_neurons)))
    return out


def search(score_fn: Callable[[BandRatios], StepScore], cands: list[BandRatios], objective: str = "ppl",
           progress: Callable[[int, int, float], None] | None = None) -> tuple[Candidate, list[Candidate]]:
    """Score every candidate; returns (best, all scored)."""
    if objective not in OBJECTIVES:
        raise InvalidArgument(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    scored = []
    for i, ratios in enumerate(cands):
        s = score_fn(ratios)
        value = s.perplexity if objective == "ppl" else s.mean_entropy
        scored.append(Candidate(ratios, value, s.perplexity, s.mean_entropy))
        log.debug("candidate %s -> %s %.4f", ratios, objective, value)
        if progress:
            progress(i + 1, len(cands), value)
    return min(scored, key=lambda c: c.score), scored


def policy_record(best: Candidate, budget: float, objective: str, predictor_version: int,
                  layout: RecordLayout, num_tokens: int, num_candidates: int, source: str = "") -> dict:
    """The JSON stored at b"policy"."""
    return {
        "format": POLICY_FORMAT,
        "ratios": best.ratios.to_dict(),
        "budget": budget,
        "byte_fraction": best.ratios.byte_fraction(layout),
        "predictor_version": predictor_version,
        "objective": objective,
        "score": best.score,
        "calibration": {"perplexity": best.perplexity, "entropy": best.entropy, "tokens": num_tokens, "text": source},
        "candidates": num_candidates,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
