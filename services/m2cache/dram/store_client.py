"""The DramTier's client of the NeuronStore, over the one RPC helper
(grpc_util.Rpc): every call carries a deadline, UNAVAILABLE (store restarting)
is retried with exponential backoff, every other failure is raised at once as
the matching :mod:`m2cache.errors` class. Records arrive streamed in chunks
(StreamNeurons), so no batch or layer size meets a message limit."""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

from m2cache import grpc_util
from m2cache_client.pb import common_pb2, store_pb2_grpc

log = logging.getLogger(__name__)


class StoreClient:
    """Typed, retrying wrapper of the NeuronStore stub. ``deadline`` arguments
    are absolute ``time.monotonic()`` instants."""

    def __init__(self, target: str, initial_backoff_s: float, max_backoff_s: float, unavailable_s: float = 30.0):
        self.target = target
        policy = grpc_util.RetryPolicy(unavailable_s=unavailable_s, initial_backoff_s=initial_backoff_s,
                                       max_backoff_s=max_backoff_s)
        self.rpc = grpc_util.Rpc(grpc_util.channel(target), store_pb2_grpc.NeuronStoreStub, "NeuronStore", policy)

    def close(self) -> None:
        self.rpc.close()

    def list_models(self, deadline: float) -> list[str]:
        return list(self.rpc.unary("ListModels", common_pb2.ListModelsRequest(), deadline).models)

    def manifest(self, model: str, deadline: float) -> common_pb2.Manifest:
        return self.rpc.unary("GetManifest", common_pb2.ManifestRequest(model=model), deadline)

    def file(self, request: common_pb2.FileRequest, deadline: float) -> common_pb2.FileBlob:
        return self.rpc.unary("FetchFile", request, deadline)

    def dense(self, request: common_pb2.DenseRequest, deadline: float) -> common_pb2.DenseBatch:
        return self.rpc.unary("FetchDense", request, deadline)

    def stream_dense(self, request: common_pb2.DenseRequest, deadline: float) -> Iterator[common_pb2.TensorChunk]:
        return self.rpc.stream("StreamDense", request, deadline)

    def stream_neurons(self, model: str, layer: int, prec: int, neuron_ids: Sequence[int], deadline: float
                       ) -> Iterator[common_pb2.NeuronBatch]:
        """The records of ``neuron_ids`` as the store streams them (chunks in request order)."""
        request = common_pb2.NeuronBatchRequest(model=model, layer=layer, precision=prec, neuron_ids=neuron_ids)
        return self.rpc.stream("StreamNeurons", request, deadline)

    def fetch_neurons(self, model: str, layer: int, prec: int, neuron_ids: Sequence[int], deadline: float
                      ) -> tuple[list[bytes], list[int], list[int]]:
        """Records of ``neuron_ids`` as (payloads, CRC-32C per record, stored length per
        record — empty for dense stores); payload j holds chunk j's records back to back."""
        payloads, crcs, lengths = [], [], []
        for batch in self.stream_neurons(model, layer, prec, neuron_ids, deadline):
            payloads.append(batch.payload)
            crcs.extend(batch.crc32c)
            lengths.extend(batch.record_lengths)
        return payloads, crcs, lengths
