"""How the worker ranks neurons: every neuron FULL (no policy, or a request asking
for full precision), or the store's policy with the trained predictors, scored
in-process (weights pulled once from the Ranker, scored with
``predictors.ranking.Ranker`` exactly as ``m2cache run`` does) or by a Rank RPC per layer."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from m2cache import grpc_util
from m2cache.codec.format import Manifest, Precision
from m2cache.errors import FailedPrecondition, M2CacheError
from m2cache.predictors.bands import BandRatios
from m2cache.predictors.predictor import Predictor
from m2cache.predictors.ranking import Ranker
from m2cache.predictors.tensors import tensor_from_bytes
from m2cache.worker.config import WorkerConfig
from m2cache.worker.provider import Choose
from m2cache_client.pb import common_pb2, ranker_pb2, ranker_pb2_grpc

log = logging.getLogger(__name__)


def full_choose(num_neurons: int) -> Choose:
    all_ids = torch.arange(num_neurons)

    def choose(layer: int, x: torch.Tensor) -> dict[Precision, torch.Tensor]:
        return {Precision.FULL: all_ids}

    return choose


def ranker_rpc(target: str, timeout_s: float, unavailable_s: float = 5.0) -> grpc_util.Rpc:
    """The Ranker's client over the one RPC helper (deadline, UNAVAILABLE retried, typed errors)."""
    policy = grpc_util.RetryPolicy(timeout_s, min(unavailable_s, timeout_s))
    return grpc_util.Rpc(grpc_util.channel(target), ranker_pb2_grpc.RankerStub, "Ranker", policy)


def remote_choose(rpc: grpc_util.Rpc, model: str, timeout_s: float) -> Choose:
    """One Rank RPC per layer and step (the Ranker applies the store's policy)."""

    def choose(layer: int, x: torch.Tensor) -> dict[Precision, torch.Tensor]:
        h = x.reshape(-1, x.shape[-1]).float().cpu().contiguous()  # [T, d]
        blob = common_pb2.TensorBlob(data=h.numpy().tobytes(), shape=list(h.shape), dtype="float32")
        resp = rpc.unary("Rank", ranker_pb2.RankRequest(model=model, layer=layer, hidden=blob),
                         time.monotonic() + timeout_s)
        return {Precision.FULL: torch.tensor(resp.full_ids, dtype=torch.long),
                Precision.INT8: torch.tensor(resp.int8_ids, dtype=torch.long),
                Precision.INT4: torch.tensor(resp.int4_ids, dtype=torch.long)}

    return choose


def pull_predictor(rpc: grpc_util.Rpc, model: str, timeout_s: float) -> Predictor:
    resp = rpc.unary("GetPredictor", ranker_pb2.PredictorRequest(model=model), time.monotonic() + timeout_s)
    tensors = {t.name: tensor_from_bytes(t.data, t.dtype, t.shape) for t in resp.tensors}
    return Predictor.from_tensors(tensors, version=resp.version)


@dataclass
class Choosers:
    full: Choose
    default: Choose
    ratios: dict[str, float] | None  # the policy's band ratios (None: all FULL)

    @classmethod
    def build(cls, config: WorkerConfig, manifest: Manifest, policy: dict | None) -> "Choosers":
        full = full_choose(manifest.d_ffn)
        if config.cache_fraction >= 1:
            log.info("cache budget %.0f%% holds model %s at full precision: dense path, no ranking%s",
                     100 * config.cache_fraction, config.model, " (its policy is not needed)" if policy else "")
            return cls(full, full, None)
        if not policy:
            log.info("model %s has no precision policy: every neuron at full precision", config.model)
            return cls(full, full, None)
        if not config.ranker_target:
            raise FailedPrecondition(
                f"model {config.model} has a precision policy; the worker needs --ranker-target to rank neurons")
        ratios = BandRatios.from_dict(policy["ratios"])
        rpc = ranker_rpc(config.ranker_target, config.fetch_deadline_s, config.unavailable_s)
        try:
            if config.rank_mode == "remote":
                return cls(full, remote_choose(rpc, config.model, config.fetch_deadline_s), ratios.to_dict())
            predictor = pull_predictor(rpc, config.model, config.fetch_deadline_s).to(config.device)
        except M2CacheError as err:
            raise FailedPrecondition(f"could not get predictors from the ranker: {err}") from err
        return cls(full, Ranker(predictor, ratios).choose(), ratios.to_dict())
