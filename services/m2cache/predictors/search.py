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
A candidate is also charged what its choices cost the worker's HBM cache at
this budget (predictors/churn.py: the bytes its misses fetch per token, as a
fraction of the layer's FULL FFN bytes). With ``max_miss`` set, candidates
over it are passed over unless none is under it (then the one that misses
least wins): a policy that fills the budget with bands whose neurons change
every token is not a policy that fits the budget. The winner is stored as the
policy (storage.save_policy) and becomes the workers' default ratios.
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
DEFAULT_MAX_MISS = 0.05  # SmolLM2-135M at 25%: INT4-only misses 2.7%, the best-ppl mixed split 9.4% (BENCHMARKS)


@dataclass(frozen=True, slots=True)
class Candidate:
    ratios: BandRatios
    score: float
    perplexity: float
    entropy: float
    miss_fraction: float | None = None  # cache misses' bytes per token / the layer's FULL bytes


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


def search(score_fn: Callable[[BandRatios], "StepScore | tuple[StepScore, float]"], cands: list[BandRatios],
           objective: str = "ppl", progress: Callable[[int, int, float], None] | None = None,
           max_miss: float | None = None) -> tuple[Candidate, list[Candidate]]:
    """Score every candidate (``score_fn``: its StepScore, or (StepScore, miss fraction));
    returns (best, all scored). ``max_miss``: see the module doc."""
    if objective not in OBJECTIVES:
        raise InvalidArgument(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if max_miss is not None and max_miss < 0:
        raise InvalidArgument(f"max_miss must be >= 0 (a fraction of the FFN bytes per token), got {max_miss}")
    scored = []
    for i, ratios in enumerate(cands):
        got = score_fn(ratios)
        s, miss = got if isinstance(got, tuple) else (got, None)
        value = s.perplexity if objective == "ppl" else s.mean_entropy
        scored.append(Candidate(ratios, value, s.perplexity, s.mean_entropy, miss))
        log.debug("candidate %s -> %s %.4f, misses %s", ratios, objective, value, miss)
        if progress:
            progress(i + 1, len(cands), value)
    return _best(scored, max_miss), scored


def _best(scored: list[Candidate], max_miss: float | None) -> Candidate:
    if max_miss is None or not scored or any(c.miss_fraction is None for c in scored):
        return min(scored, key=lambda c: c.score)
    within = [c for c in scored if c.miss_fraction <= max_miss]
    if not within:
        least = min(scored, key=lambda c: c.miss_fraction)
        log.warning("no candidate misses at most %.1f%% of the FFN bytes per token; the least (%.1f%%) wins",
                    100 * max_miss, 100 * least.miss_fraction)
        return least
    return min(within, key=lambda c: c.score)


def policy_record(best: Candidate, budget: float, objective: str, predictor_version: int,
                  layout: RecordLayout, num_tokens: int, num_candidates: int, source: str = "",
                  max_miss: float | None = None, scored: list[Candidate] | None = None) -> dict:
    """The JSON stored at b"policy"."""
    extra = {} if best.miss_fraction is None else {
        "miss_fraction": best.miss_fraction, "max_miss": max_miss,
        "scored": [{"ratios": c.ratios.to_dict(), "score": c.score, "miss_fraction": c.miss_fraction}
                   for c in scored or []]}
    return extra | {
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
