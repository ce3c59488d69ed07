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

from m2cache.codec import bitmap
from m2cache.codec.checksum import crc32c
from m2cache.codec.format import DTYPES, Manifest, Precision, RecordLayout, crc32
from m2cache.errors import ChecksumError, Unavailable
from m2cache_client.pb import common_pb2, dram_pb2, dram_pb2_grpc

log = logging.getLogger(__name__)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


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
    fetch including its retries; ``backoff_s`` doubles per retry up to 1 s."""

    channel: grpc.Channel
    model: str
    caller_id: str
    deadline_s: float = 30.0
    backoff_s: float = 0.05
    verify: bool = True
    stats: FetchStats = field(default_factory=FetchStats)
    layout: RecordLayout | None = None  # set by manifest(); bitmap records need it to decode

    def __post_init__(self) -> None:
        self.stub = dram_pb2_grpc.DramTierStub(self.channel)

    def _call(self, method, request):
        """Unary call with retries on transient codes until the deadline passes."""
        end = time.monotonic() + self.deadline_s
        delay = self.backoff_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise Unavailable(f"DRAM tier unavailable for {self.deadline_s:.1f}s")
            try:
                return method(request, timeout=left)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise
                if time.monotonic() + delay >= end:
                    raise Unavailable(f"DRAM tier unavailable within the {self.deadline_s:.1f}s deadline: {err.details()}") from err
                self.stats.retries += 1
                log.warning("DRAM tier %s (%s); retrying in %.2fs", err.code().name, err.details(), delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def manifest(self) -> tuple[Manifest, dict | None]:
        resp = self._call(self.stub.GetManifest, common_pb2.ManifestRequest(model=self.model))
        policy = json.loads(resp.policy_json) if resp.policy_json else None
        manifest = Manifest.from_json(resp.manifest_json.encode(), where=f"model {self.model}")
        self.layout = manifest.layout
        return manifest, policy

    def dense(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Dense tensors by name (all of them when ``names`` is None)."""
        resp = self._call(self.stub.FetchDense, common_pb2.DenseRequest(model=self.model, names=names or []))
        out = {}
        for blob in resp.tensors:
            if self.verify and crc32(blob.data) != blob.crc32:
                raise ChecksumError(f"dense tensor {blob.name!r} arrived corrupted")
            t = torch.frombuffer(bytearray(blob.data), dtype=DTYPES[blob.dtype]) if blob.data else torch.empty(0, dtype=DTYPES[blob.dtype])
            out[blob.name] = t.reshape(list(blob.shape))
        return out

    def file(self, filename: str) -> bytes:
        return self._call(self.stub.FetchFile, common_pb2.FileRequest(model=self.model, filename=filename)).data

    def neurons(self, layer: int, prec: Precision, ids: torch.Tensor, current_layer: int) -> torch.Tensor:
        """Records of ``ids`` [m] -> uint8 [m, record_bytes], in ids order."""
        t0 = time.perf_counter()
        req = dram_pb2.DramFetchRequest(
            batch=common_pb2.NeuronBatchRequest(model=self.model, layer=layer, neuron_ids=ids.tolist(), precision=int(prec)),
            current_layer=current_layer, caller_id=self.caller_id,
        )
        resp = self._call(self.stub.FetchNeurons, req)
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
