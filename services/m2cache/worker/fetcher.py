"""The worker's view of the tiers below it: one DramTier client with deadlines,
retries with backoff, and checksum verification of every record received.

Bitmap stores (codec/bitmap.py) send variable-size records; they are verified as
received and decompressed here, so everything above (HBM cache, provider)
sees the fixed-size dense records of the dense codec."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from m2cache import grpc_util

from m2cache.codec import bitmap
from m2cache.codec.checksum import crc32c
from m2cache.codec.format import DTYPES, Manifest, Precision, RecordLayout, crc32
from m2cache.errors import ChecksumError
from m2cache_client.pb import common_pb2, dram_pb2, dram_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class FetchStats:
    calls: int = 0
    records: int = 0
    bytes: int = 0
    retries: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0  # bitmap decompression (inside ``seconds``)


@dataclass
class TierFetcher:
    """Fetches records over a DramTier channel. ``deadline_s`` bounds one logical
    fetch including its retries; UNAVAILABLE is retried with backoff from
    ``backoff_s`` (doubling up to 1 s) for at most ``unavailable_s``; any other
    status is raised at once as its typed error (grpc_util.Rpc)."""

    channel: grpc.Channel
    model: str
    caller_id: str
    deadline_s: float = 30.0
    backoff_s: float = 0.05
    verify: bool = True
    stats: FetchStats = field(default_factory=FetchStats)
    layout: RecordLayout | None = None  # set by manifest(); bitmap records need it to decode
    unavailable_s: float = 5.0

    def __post_init__(self) -> None:
        policy = grpc_util.RetryPolicy(self.deadline_s, min(self.unavailable_s, self.deadline_s), self.backoff_s)
        self.rpc = grpc_util.Rpc(self.channel, dram_pb2_grpc.DramTierStub, "DRAM tier", policy,
                                 on_retry=lambda *_: self._count_retry())

    def _count_retry(self) -> None:
        self.stats.retries += 1

    def manifest(self) -> tuple[Manifest, dict | None]:
        resp = self.rpc.unary("GetManifest", common_pb2.ManifestRequest(model=self.model))
        policy = json.loads(resp.policy_json) if resp.policy_json else None
        manifest = Manifest.from_json(resp.manifest_json.encode(), where=f"model {self.model}")
        self.layout = manifest.layout
        return manifest, policy

    def dense(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Dense tensors by name (all of them when ``names`` is None), streamed in
        bounded chunks (any tensor size) and checked against their crc32."""
        return assemble_dense(self.rpc.stream("StreamDense", common_pb2.DenseRequest(model=self.model,
                                                                                     names=names or [])),
                              self.verify)

    def file(self, filename: str) -> bytes:
        return self.rpc.unary("FetchFile", common_pb2.FileRequest(model=self.model, filename=filename)).data

    def neurons(self, layer: int, prec: Precision, ids: torch.Tensor, current_layer: int) -> torch.Tensor:
        """Records of ``ids`` [m] -> uint8 [m, record_bytes], in ids order."""
        t0 = time.perf_counter()
        req = dram_pb2.DramFetchRequest(
            batch=common_pb2.NeuronBatchRequest(model=self.model, layer=layer, neuron_ids=ids.tolist(), precision=int(prec)),
            current_layer=current_layer, caller_id=self.caller_id,
        )
        resp = self.rpc.unary("FetchNeurons", req)
        if resp.record_lengths:
            out = self._decode_sparse(resp, layer, prec, ids)
        else:
            rb = resp.record_bytes
            recs = np.frombuffer(resp.payload, dtype=np.uint8).reshape(len(ids), rb) if len(ids) else np.empty((0, rb), np.uint8)
            if self.verify:
                self._verify(recs, resp, layer, prec, ids)
            out = torch.from_numpy(recs.copy())
        self.stats.calls += 1
        self.stats.records += len(ids)
        self.stats.bytes += len(resp.payload)
        self.stats.seconds += time.perf_counter() - t0
        return out

    def _decode_sparse(self, resp, layer: int, prec: Precision, ids: torch.Tensor) -> torch.Tensor:
        """Variable-size (bitmap store) records -> dense records uint8 [m, record_bytes]."""
        lengths = np.asarray(resp.record_lengths, dtype=np.int64)
        if len(lengths) != len(ids) or int(lengths.sum()) != len(resp.payload):
            raise ChecksumError(f"layer {layer} {prec.name}: record lengths do not match the payload")
        if self.verify:
            view = memoryview(resp.payload)
            ends = np.cumsum(lengths)
            self._verify([view[e - n : e] for e, n in zip(ends.tolist(), lengths.tolist())], resp, layer, prec, ids)
        assert self.layout is not None, "manifest() sets the layout before any fetch"
        t0 = time.perf_counter()
        out = bitmap.decode_bytes(resp.payload, lengths, bitmap.element_spec(self.layout, prec))
        self.stats.decode_seconds += time.perf_counter() - t0
        return out

    @staticmethod
    def _verify(recs, resp, layer: int, prec: Precision, ids: torch.Tensor) -> None:
        """Every record (rows of an array, or byte slices) against its CRC-32C."""
        if len(resp.crc32c) != len(recs):
            raise ChecksumError(f"layer {layer} {prec.name}: {len(resp.crc32c)} checksums for {len(recs)} records")
        for i, (row, want) in enumerate(zip(recs, resp.crc32c)):
            if crc32c(row if isinstance(row, memoryview) else row.tobytes()) != want:
                raise ChecksumError(f"record layer {layer} neuron {int(ids[i])} {prec.name} arrived corrupted")


def assemble_dense(chunks, verify: bool = True) -> dict[str, torch.Tensor]:
    """TensorChunk messages (consecutive chunks per tensor) -> name -> tensor, each
    assembled into one preallocated buffer and checked against its crc32."""
    out: dict[str, torch.Tensor] = {}
    buf, meta, filled = None, None, 0
    for chunk in chunks:
        if chunk.offset == 0:
            if buf is not None:
                raise ChecksumError(f"dense tensor {meta.name!r} arrived incomplete ({filled} of "
                                    f"{meta.total_bytes} B)")
            buf, meta, filled = torch.empty(chunk.total_bytes, dtype=torch.uint8), chunk, 0
        if meta is None or chunk.name != meta.name or chunk.offset != filled:
            raise ChecksumError(f"dense tensor chunk {chunk.name!r} at {chunk.offset} arrived out of order")
        n = len(chunk.data)
        if filled + n > meta.total_bytes:
            raise ChecksumError(f"dense tensor {meta.name!r} arrived with more than its {meta.total_bytes} B")
        if n:
            buf.numpy()[filled : filled + n] = np.frombuffer(chunk.data, dtype=np.uint8)
        filled += n
        if filled == meta.total_bytes:
            if verify and crc32(buf.numpy()) != meta.crc32:
                raise ChecksumError(f"dense tensor {meta.name!r} arrived corrupted")
            out[meta.name] = buf.view(DTYPES[meta.dtype]).reshape(list(meta.shape))
            buf, meta = None, None
    if buf is not None:
        raise ChecksumError(f"dense tensor {meta.name!r} arrived incomplete ({filled} of {meta.total_bytes} B)")
    return out
