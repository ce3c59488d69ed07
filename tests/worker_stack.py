"""Helpers for worker tests: a real Worker gRPC server over a real DramTier
(real Redis, real LMDB store), and in-process references to compare against."""
from __future__ import annotations

import dataclasses

import grpc
import torch

from m2cache import grpc_util
from m2cache.codec.format import Precision
from m2cache.store.reader import NeuronStore
from m2cache.model.generate import Sampling, generate
from m2cache.local.loader import load_model
from m2cache.model.providers import ChoiceProvider
from m2cache.predictors.bands import BandRatios
from m2cache.predictors.kinds import LowRankPredictor
from m2cache.predictors.predictor import Predictor
from m2cache.worker import server as worker_server
from m2cache.predictors.ranking import Ranker
from m2cache.worker.choosers import Choosers, full_choose
from m2cache.worker.config import WorkerConfig
from m2cache.worker.runtime import WorkerRuntime
from m2cache_client.pb import worker_pb2, worker_pb2_grpc

DEADLINE_S = 60.0
RATIOS = BandRatios(0.2, 0.25, 0.25)


def random_predictor(store: NeuronStore, seed: int = 0, rank: int = 16) -> Predictor:
    """A fixed random low-rank scorer: a deterministic, input-dependent ranking,
    enough to exercise sparse mixed-precision choices without training."""
    g = torch.Generator().manual_seed(seed)
    m = store.manifest
    layers = [LowRankPredictor(torch.randn(m.d_model, rank, generator=g), torch.randn(rank, m.d_ffn, generator=g),
                             torch.zeros(m.d_ffn)) for _ in range(m.num_layers)]
    return Predictor(layers)


def mixed_choosers(store: NeuronStore, ratios: BandRatios = RATIOS) -> Choosers:
    choose = Ranker(random_predictor(store), ratios).choose()
    return Choosers(full_choose(store.manifest.d_ffn), choose, ratios.to_dict())


class WorkerHandle:
    def __init__(self, dram_target: str, model: str, choosers: Choosers | None = None, **overrides):
        self.config = dataclasses.replace(WorkerConfig(model=model, dram_target=dram_target, address="127.0.0.1:0",
                                                       fetch_deadline_s=5.0), **overrides)
        runtime = WorkerRuntime.connect(self.config, choosers)
        self.server, self.port, self.runtime = worker_server.create_server(self.config, runtime)
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc_util.channel(self.target)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, timeout: float = DEADLINE_S, **fields):
        """(generated ids, final stats) of one streamed request."""
        fields.setdefault("model", self.config.model)
        req = worker_pb2.GenerateRequest(prompt_token_ids=prompt_ids, max_new_tokens=max_new_tokens, **fields)
        ids, stats = [], None
        for msg in self.stub.Generate(req, timeout=timeout):
            if msg.HasField("stats"):
                stats = msg.stats
            else:
                ids.append(msg.token_id)
        return ids, stats

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()
        self.runtime.close()


def reference_tokens(store: NeuronStore, prompt_ids: list[int], max_new_tokens: int, choose=None,
                     sampling: Sampling = Sampling()) -> list[int]:
    """In-process reference model from the store with the same neuron choices."""
    model, _tok, bank = load_model(store)
    choose = choose or full_choose(store.manifest.d_ffn)
    return generate(model, prompt_ids, max_new_tokens, ChoiceProvider(bank, choose), sampling)


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    raise AssertionError("call succeeded; expected an error status")


__all__ = ["Precision", "WorkerHandle", "reference_tokens", "mixed_choosers", "status_of", "RATIOS", "random_predictor"]
