"""The precision policies the benchmark runs m2cache with (each object has
``choose()``, ``ratios`` and ``source``, the label the report prints):

- "mixed": the store's trained predictor and policy when the ranker has written
  them, else a fixed random low-rank predictor (deterministic, input-dependent,
  untrained) and the flag's band ratios;
- "oracle": bands by the true activation magnitudes (every FULL neuron decoded
  and resident to compute them): an upper bound for any predictor's choices,
  hit rate and bytes, not a deployable system (its tok/s includes the oracle);
- "int4": every neuron at INT4, no ranking (the configuration llama.cpp's Q4 GGUFs run:
  all weights 4-bit, nothing skipped);
- "trace-driven": a real model's recorded choices replayed (bench/harness/trace.py)."""
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


@dataclass
class OraclePolicy:
    bank: object
    ffn_kind: str
    ratios: BandRatios
    source: str = "oracle (true activation magnitudes; an upper bound, not a system)"
    store: object = None  # kept open: the bank decodes from it

    def choose(self):
        from m2cache.predictors.ranking import oracle_choose

        return oracle_choose(self.bank, self.ffn_kind, self.ratios)


def load_oracle_policy(store_path: Path, ratios: BandRatios) -> OraclePolicy:
    """Every layer's FULL neurons decoded now (before any timing), kept for the run."""
    from m2cache.codec.format import Precision
    from m2cache.model.providers import WeightBank
    from m2cache.store.reader import NeuronStore

    store = NeuronStore(store_path)
    bank = WeightBank.from_store(store)
    for layer in range(store.manifest.num_layers):
        bank.vectors(layer, Precision.FULL)
    return OraclePolicy(bank, store.manifest.ffn_kind, ratios, store=store)


@dataclass
class UniformPolicy:
    """Every neuron at one precision; no predictor runs."""

    num_neurons: int
    ratios: BandRatios = BandRatios(0.0, 0.0, 1.0)
    source: str = "every neuron INT4 (no ranking)"

    def choose(self):
        from m2cache.codec.format import Precision

        every = {Precision.INT4: torch.arange(self.num_neurons)}
        return lambda layer, x: every


def load_policy(name: str, store_path: Path, manifest: Manifest, ratios: BandRatios, trace_path: str | None = None):
    """The policy object for ``name`` (None for "full": every neuron at FULL)."""
    if name == "full":
        return None
    if name == "mixed":
        return load_mixed_policy(store_path, manifest, ratios)
    if name == "oracle":
        return load_oracle_policy(store_path, ratios)
    if name == "int4":
        return UniformPolicy(manifest.d_ffn)
    if name == "trace-driven":
        from bench.harness.trace import Trace, TracePolicy

        return TracePolicy(Trace.load(Path(trace_path)), manifest.num_layers, manifest.d_ffn)
    raise ValueError(f"unknown policy {name!r}")
