"""The DramTier's client of the NeuronStore: every call carries a deadline;
UNAVAILABLE (store restarting) is retried with exponential backoff until that
deadline; other failures become the matching :mod:`m2cache.errors` class."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import grpc

from m2cache import errors, grpc_util
from m2cache_client.pb import common_pb2, store_pb2_grpc

log = logging.getLogger(__name__)

_ERRORS = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.DATA_LOSS: errors.ChecksumError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
}


class StoreClient:
    """Typed, retrying wrapper of the NeuronStore stub. ``deadline`` arguments
    are absolute ``time.monotonic()`` instants."""

    def __init__(self, target: str, initial_backoff_s: float, max_backoff_s: float):
        # Reconnect quickly after a store restart (gRPC's default first backoff is 1 s).
        options = grpc_util.CHANNEL_OPTIONS + [
            ("grpc.initial_reconnect_backoff_ms", max(1, int(initial_backoff_s * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(1, int(initial_backoff_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(max_backoff_s * 1000))),
        ]
        self.target = target
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = store_pb2_grpc.NeuronStoreStub(self.channel)
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request, deadline: float, stream: bool = False):
        """Call ``method``, retrying UNAVAILABLE with backoff while the deadline allows
        (``stream``: a server-streaming method, its messages collected into a list)."""
        backoff = self.initial_backoff_s
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.DeadlineExceeded(f"NeuronStore {method}: deadline passed after {attempt} attempt(s)")
            attempt += 1
            try:
                got = getattr(self.stub, method)(request, timeout=remaining)
                return list(got) if stream else got
            except grpc.RpcError as err:
                code = err.code()
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise _ERRORS.get(code, errors.M2CacheError)(f"NeuronStore: {err.details()}") from None
                pause = min(backoff, deadline - time.monotonic())
                log.info("NeuronStore %s unavailable (attempt %d), retrying in %.3fs", method, attempt, pause)
                if pause <= 0:
                    raise errors.Unavailable(f"NeuronStore at {self.target} unavailable: {err.details()}") from None
                time.sleep(pause)
                backoff = min(backoff * 2, self.max_backoff_s)

    def list_models(self, deadline: float) -> list[str]:
        return list(self.call("ListModels", common_pb2.ListModelsRequest(), deadline).models)

    def manifest(self, model: str, deadline: float) -> common_pb2.Manifest:
        return self.call("GetManifest", common_pb2.ManifestRequest(model=model), deadline)

    def fetch_neurons(self, model: str, layer: int, prec: int, neuron_ids: Sequence[int], chunk_ids: int,
                      deadline: float) -> tuple[list[bytes], list[int], list[int]]:
        """Records of ``neuron_ids`` (one batched call per ``chunk_ids``) as
        (payloads, crc32 per record, stored length per record — empty for dense
        stores); payload j holds its chunk's records back to back."""
        payloads, crcs, lengths = [], [], []
        for i in range(0, len(neuron_ids), chunk_ids):
            request = common_pb2.NeuronBatchRequest(model=model, layer=layer, precision=prec,
                                                    neuron_ids=neuron_ids[i : i + chunk_ids])
            for batch in self.call("StreamNeurons", request, deadline, stream=True):
                payloads.append(batch.payload)
                crcs.extend(batch.crc32c)
                lengths.extend(batch.record_lengths)
        return payloads, crcs, lengths
