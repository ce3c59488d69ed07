"""The mixed-precision policy the benchmark runs m2cache with: the store's
trained predictor and policy when the ranker has written them, else a fixed
random low-rank predictor (deterministic, input-dependent, untrained) and the
flag's band ratios. ``describe`` says which, for the report."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from m2cache.codec.format import Manifest
from m2cache.predictors.bands import BandRatios, assign_bands
from m2cache.predictors.kinds import LowRankPredictor
from m2cache.predictors.predictor import Predictor

log = logging.getLogger(__name__)


@dataclass
class MixedPolicy:
    predictor: Predictor
    ratios: BandRatios
    source: str  # "trained vN" | "random rank-R (no trained predictor in the store)"

    def choose(self):
        """The worker's local ranking: score x [1, T, d] with the layer's predictor, one band set."""
        def choose(layer: int, x: torch.Tensor) -> dict:
            scores = self.predictor.scores(layer, x.reshape(-1, x.shape[-1]))  # [T, d_ffn]
            return {p: ids.cpu() for p, ids in assign_bands(scores, self.ratios).as_choice().items()}
        return choose


def random_predictor(manifest: Manifest, rank: int = 16, seed: int = 0) -> Predictor:
    """Per layer scores = (x @ a) @ b with fixed Gaussian a [d, r], b [r, F]."""
    g = torch.Generator().manual_seed(seed)
    layers = [LowRankPredictor(torch.randn(manifest.d_model, rank, generator=g),
                             torch.randn(rank, manifest.d_ffn, generator=g), torch.zeros(manifest.d_ffn))
              for _ in range(manifest.num_layers)]
    return Predictor(layers)


def load_mixed_policy(store_path: Path, manifest: Manifest, ratios: BandRatios) -> MixedPolicy:
    """Call before the process opens its own NeuronStore on ``store_path`` (one LMDB handle per process)."""
    try:
        from m2cache.predictors import storage

        predictor = storage.load_predictor(str(store_path))
        policy = storage.load_policy(str(store_path))
        if policy:
            ratios = BandRatios.from_dict(policy["ratios"])
        return MixedPolicy(predictor, ratios, f"trained predictor v{predictor.version}")
    except Exception as err:  # no predictor yet (or the ranker's storage API moved): say so
        log.info("no trained predictor in %s (%s): using a random one", store_path, err)
        return MixedPolicy(random_predictor(manifest), ratios, "random rank-16 predictor (none trained in the store)")
