"""Turning hidden states into band choices: the in-process API the worker and
``m2cache run`` use, and the oracle used as an upper bound in benchmarks.

Worker usage::

    ranker = Ranker.from_store(store)          # newest predictor + the store's policy
    bands = ranker.rank(layer, x)              # x [n, d] or [B, T, d] -> PrecisionBands
    provider = ChoiceProvider(bank, ranker.choose())
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from m2cache.codec.format import Precision
from m2cache.errors import FailedPrecondition
from m2cache.predictors import storage
from m2cache.predictors.bands import BandRatios, PrecisionBands, assign_bands
from m2cache.predictors.collect import neuron_magnitudes
from m2cache.predictors.predictor import Predictor


@dataclass(slots=True)
class Ranker:
    """A model's predictor plus its default band ratios (the store's policy)."""

    predictor: Predictor
    ratios: BandRatios | None = None

    @classmethod
    def from_store(cls, store, require_policy: bool = False) -> "Ranker":
        """Newest stored predictor and the stored policy's ratios (None if no policy)."""
        predictor = storage.load_predictor(store)
        policy = storage.load_policy(store)
        if policy is None and require_policy:
            raise FailedPrecondition(f"{getattr(store, 'path', store)} has no policy; run `m2cache search-policy`")
        ratios = BandRatios.from_dict(policy["ratios"]) if policy else None
        return cls(predictor, ratios)

    def resolve(self, ratios: BandRatios | None) -> BandRatios:
        ratios = ratios or self.ratios
        if ratios is None:
            raise FailedPrecondition("no band ratios given and the store has no policy; run `m2cache search-policy`")
        return ratios

    def rank(self, layer: int, hidden: torch.Tensor, ratios: BandRatios | None = None) -> PrecisionBands:
        """hidden [n, d] or [B, T, d] FFN inputs -> one set of bands for all rows."""
        scores = self.predictor.scores(layer, hidden.reshape(-1, hidden.shape[-1]))  # [n, F]
        return assign_bands(scores, self.resolve(ratios))

    def choose(self, ratios: BandRatios | None = None):
        """A ChoiceProvider choose function ranking with this predictor."""
        ratios = self.resolve(ratios)

        def choose(layer: int, x: torch.Tensor) -> dict[Precision, torch.Tensor]:
            return {p: ids.to(x.device) for p, ids in self.rank(layer, x, ratios).as_choice().items()}

        return choose


def oracle_choose(bank, ffn_kind: str, ratios: BandRatios):
    """Choose by the true activation magnitudes (needs every FULL neuron: an upper bound, not a system)."""

    def choose(layer: int, x: torch.Tensor) -> dict[Precision, torch.Tensor]:
        vectors, bias = bank.vectors(layer, Precision.FULL), bank.bias(layer)
        mags = neuron_magnitudes(vectors, bias, x.reshape(-1, x.shape[-1]), ffn_kind)  # [n, F]
        return assign_bands(mags, ratios).as_choice()

    return choose
