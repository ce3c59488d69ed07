"""Ranker gRPC service: thin proto <-> domain layer over :class:`RankerCatalog`
(ranking in ranking.py/bands.py, training in pipeline.py)."""
from __future__ import annotations

import logging
import queue
import threading

import grpc
import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter

from m2cache import grpc_util
from m2cache.codec.format import DTYPES
from m2cache.errors import InvalidArgument, M2CacheError, ResourceExhausted
from m2cache.metrics import RpcMetrics, start_metrics_server
from m2cache.predictors.bands import BandRatios
from m2cache.ranker.catalog import RankerCatalog
from m2cache.ranker.config import RankerConfig
from m2cache.predictors.tensors import tensor_to_bytes
from m2cache.predictors.pipeline import DEFAULT_EPOCHS, DEFAULT_TRAIN_TOKENS, TrainJob
from m2cache_client.pb import common_pb2, ranker_pb2, ranker_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name
PROGRESS_MESSAGES = 100  # train-step progress messages per job, at most (plus stage changes)


class RankerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.rpc = RpcMetrics("ranker", registry)
        self.rows = Counter("m2cache_ranker_rows", "hidden-state rows ranked", ["model"], registry=registry)
        self.trained = Counter("m2cache_ranker_trainings", "predictor versions trained", ["model"], registry=registry)


def blob_to_tensor(blob: common_pb2.TensorBlob) -> torch.Tensor:
    """TensorBlob -> float32 tensor of its shape; InvalidArgument if inconsistent."""
    dtype = DTYPES.get(blob.dtype)
    if dtype is None:
        raise InvalidArgument(f"hidden states dtype {blob.dtype!r} unsupported; use one of {', '.join(DTYPES)}")
    shape = list(blob.shape)
    numel = int(np.prod(shape)) if shape else 0
    if len(shape) != 2 or numel * dtype.itemsize != len(blob.data) or numel == 0:
        raise InvalidArgument(f"hidden states must be a non-empty [n, d] blob matching its data, "
                              f"got shape {shape} with {len(blob.data)} bytes of {blob.dtype}")
    return torch.frombuffer(bytearray(blob.data), dtype=dtype).reshape(shape).float()


def tensor_to_blob(name: str, t: torch.Tensor) -> common_pb2.TensorBlob:
    """A predictor tensor in its resident dtype (float16 factors, int8 gate rows...)."""
    raw, dtype = tensor_to_bytes(t)
    return common_pb2.TensorBlob(name=name, data=raw, shape=list(t.shape), dtype=dtype)


class RankerServicer(ranker_pb2_grpc.RankerServicer):
    def __init__(self, config: RankerConfig, catalog: RankerCatalog, metrics: RankerMetrics):
        self.config = config
        self.catalog = catalog
        self.metrics = metrics

    def Rank(self, request, context):
        """Bands for a batch of FFN inputs (one shared set, see bands.py)."""
        with self.metrics.rpc.observe("Rank"):
            ranker = self.catalog.get(request.model)
            hidden = blob_to_tensor(request.hidden)
            if hidden.shape[0] > self.config.max_rows:
                raise ResourceExhausted(f"{hidden.shape[0]} rows exceed the limit of {self.config.max_rows}; split them")
            ratios = None
            if request.HasField("ratios"):
                r = request.ratios
                ratios = BandRatios(r.full, r.int8, r.int4)
            bands = ranker.rank(request.layer, hidden, ratios)
            self.metrics.rows.labels(request.model).inc(hidden.shape[0])
            return ranker_pb2.RankResponse(full_ids=bands.full_ids.tolist(), int8_ids=bands.int8_ids.tolist(),
                                           int4_ids=bands.int4_ids.tolist())

    def GetPredictor(self, request, context):
        """The served predictor's named tensors (all layers, or the requested
        ones: ``layer.{i}.*`` and the look-ahead ``ahead.{i}.*``); the names
        identify each layer's predictor kind (predictors/predictor.py)."""
        with self.metrics.rpc.observe("GetPredictor"):
            predictor = self.catalog.get(request.model).predictor
            layers = list(request.layers) or list(range(predictor.num_layers))
            for layer in layers:
                if layer >= predictor.num_layers:
                    raise InvalidArgument(f"layer {layer} out of range: the model has {predictor.num_layers} layers")
            wanted = {str(i) for i in layers}
            blobs = [tensor_to_blob(name, t) for name, t in predictor.tensors().items() if name.split(".")[1] in wanted]
            return ranker_pb2.PredictorWeights(model=request.model, version=predictor.version, tensors=blobs)

    def TrainPredictor(self, request, context):
        """Train and store a new predictor version, streaming progress; the last
        message has stage "done" and the version."""
        with self.metrics.rpc.observe("TrainPredictor"):
            job = self._job(request)
            yield from self._run_streaming(request.model, job)
            self.metrics.trained.labels(request.model).inc()

    def _job(self, request) -> TrainJob:
        self.catalog.path(request.model)  # unknown model: NOT_FOUND before any work
        max_tokens = request.max_tokens or DEFAULT_TRAIN_TOKENS
        if max_tokens > self.config.max_train_tokens:
            raise ResourceExhausted(f"max_tokens {max_tokens} exceeds the limit of {self.config.max_train_tokens}")
        return TrainJob(request.text, rank=request.rank or None, max_tokens=max_tokens,
                        epochs=request.epochs or DEFAULT_EPOCHS, device=self.config.device, source="TrainPredictor")

    def _run_streaming(self, model: str, job: TrainJob):
        """Run the job in a thread; relay its progress as TrainProgress messages."""
        events: queue.Queue = queue.Queue()
        last = {}

        def progress(stage: str, step: int, total: int, loss: float) -> None:
            every = max(1, total // PROGRESS_MESSAGES)
            if stage != last.get("stage") or step % every == 0 or step == total:
                last["stage"] = stage
                events.put(ranker_pb2.TrainProgress(stage=stage, step=step, total=total, loss=loss))

        def work() -> None:
            try:
                version = self.catalog.train(model, job, progress)
                events.put(ranker_pb2.TrainProgress(stage="done", step=1, total=1, version=version))
            except Exception as err:  # relayed to the RPC thread, re-raised there
                events.put(err)

        threading.Thread(target=work, name=f"train-{model}", daemon=True).start()
        while True:
            item = events.get()
            if isinstance(item, Exception):
                raise item if isinstance(item, M2CacheError) else RuntimeError(f"training failed: {item}")
            yield item
            if item.stage == "done":
                return


def create_server(config: RankerConfig, registry: CollectorRegistry | None = None
                  ) -> tuple[grpc.Server, int, RankerCatalog]:
    """A Ranker server bound to ``config.address`` (not started)."""
    catalog = RankerCatalog(config.root, config.device)
    servicer = RankerServicer(config, catalog, RankerMetrics(registry or CollectorRegistry()))
    server, port, _health = grpc_util.create_server(
        config.address, [(ranker_pb2_grpc.add_RankerServicer_to_server, servicer)], [SERVICE_NAME],
        max_workers=config.max_workers)
    log.info("Ranker for %s on port %d", config.root, port)
    return server, port, catalog


def serve(config: RankerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain for ``grace_s``."""
    registry = CollectorRegistry()
    server, _port, _catalog = create_server(config, registry)
    start_metrics_server(config.metrics_port, registry)
    grpc_util.serve_until_signal(server, config.grace_s)
