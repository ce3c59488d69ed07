"""The worker's view of the tiers below it.

Control plane: the DramTier (manifest, where the bytes are, usage reports).
Data plane, per fetch of one layer at one precision, nearest tier first:
1. on the store's host, what its page cache holds, without touching the device
   (worker/same_host.py): read by this worker from the store's records file, whose
   descriptor the store passed (short_circuit.py), or else copied by the store into
   this worker's shared-memory region (one Unix-socket round trip per region's worth);
2. Redis MGETs of the rest's keys, about 1 MiB each; every value's MAC is checked
   (dram/dataplane.py) and the records land in the caller's buffer;
3. the misses come from the NeuronStore's device: on the same host read here from the
   shared file or by the store into the region, elsewhere streamed (StreamNeurons);
4. every record's CRC-32C is checked in one pass per batch;
5. what was used and what missed is reported to the tier in the background.
With the DramTier gone the worker keeps reading Redis and the store; with
Redis gone it reads everything from the store; with the store gone a fetch
fails with a typed UNAVAILABLE within ``unavailable_s``, not the deadline.
Without a data plane (``data_plane=False``) records come through the tier's
FetchNeurons. Bitmap stores' records are verified as received and decoded
here, so everything above (HBM cache, provider) sees dense records.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from m2cache import grpc_util
from m2cache.codec.format import Manifest, Precision, RecordLayout
from m2cache.dram import dataplane, id_sets
from m2cache.dram.cache import CacheUnavailable, RedisCache
from m2cache.errors import ChecksumError, FailedPrecondition, M2CacheError
from m2cache.store.shared import DEFAULT_REGION_BYTES
from m2cache.worker.records import Reporter, assemble_dense, check_rows, place
from m2cache.worker.same_host import SameHostStore
from m2cache_client.pb import common_pb2, dram_pb2, dram_pb2_grpc, store_pb2_grpc

log = logging.getLogger(__name__)
MGET_BYTES = 1 << 20  # records per Redis round trip: about this many bytes (a layer's hits take a few)


@dataclass
class FetchStats:
    calls: int = 0
    records: int = 0
    bytes: int = 0
    retries: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0  # bitmap decompression (inside ``seconds``)
    redis_records: int = 0       # DRAM-tier hits read from Redis
    redis_bytes: int = 0
    store_records: int = 0       # misses read from the NeuronStore
    store_bytes: int = 0
    shared_reads: int = 0        # round trips into the shared region (same host: page cache or store reads)
    page_cache_records: int = 0  # misses the store's page cache held (same host), before Redis
    page_cache_bytes: int = 0
    local_records: int = 0       # of the page cache's and the store's, read by this worker itself (short-circuit)


@dataclass
class TierFetcher:
    """Fetches records for one model. ``deadline_s`` bounds one logical fetch;
    UNAVAILABLE is retried with backoff from ``backoff_s`` for at most
    ``unavailable_s``; any other status is raised at once as its typed error.
    Secrets come from files (``mac_key_file``, ``redis_password_file``) or, when
    those are empty, from the tier's DataPlane answer."""

    channel: grpc.Channel
    model: str
    caller_id: str
    deadline_s: float = 30.0
    backoff_s: float = 0.05
    verify: bool = True
    stats: FetchStats = field(default_factory=FetchStats)
    layout: RecordLayout | None = None  # set by manifest()
    unavailable_s: float = 5.0
    store_target: str = ""              # the NeuronStore; empty: learnt from the tier
    data_plane: bool = True             # read Redis and the store directly (else through the tier)
    mac_key_file: str = ""
    redis_password_file: str = ""
    redis_timeout_s: float = 0.5
    redis_retry_s: float = 1.0          # how long Redis stays "away" after a failure before a retry
    pin_memory: bool = False            # page-locked destination buffers (a CUDA worker's staging)
    shared_memory_bytes: int = DEFAULT_REGION_BYTES  # same-host misses land in a region this big; 0 = stream
    page_cache_first: bool = True       # same host: what the store's page cache holds before Redis (same_host.py)
    short_circuit: bool = True          # same host: read the store's records file here (short_circuit.py)

    def __post_init__(self) -> None:
        self.policy = grpc_util.RetryPolicy(self.deadline_s, min(self.unavailable_s, self.deadline_s),
                                            self.backoff_s)
        self.rpc = grpc_util.Rpc(self.channel, dram_pb2_grpc.DramTierStub, "DRAM tier", self.policy,
                                 on_retry=lambda *_: self._count_retry())
        self.store: grpc_util.Rpc | None = None
        self.redis: RedisCache | None = None
        self.seal: dataplane.RecordSeal | None = None
        self._redis_down_until = 0.0
        self._plane_info = None
        self._manifest: Manifest | None = None
        self.reporter: Reporter | None = None
        self._shared: SameHostStore | None = None
        self._shared_tried = False
        self._shared_lock = threading.Lock()  # the prefetch thread fetches too

    @classmethod
    def from_config(cls, config) -> "TierFetcher":
        """The fetcher a worker with ``config`` (worker/config.py) uses."""
        return cls(grpc_util.channel(config.dram_target), config.model, config.worker_id,
                   deadline_s=config.fetch_deadline_s, unavailable_s=config.unavailable_s,
                   store_target=config.store_target, data_plane=config.data_plane,
                   mac_key_file=config.mac_key_file, redis_password_file=config.redis_password_file,
                   pin_memory=config.device.startswith("cuda") and torch.cuda.is_available(),
                   shared_memory_bytes=config.shared_memory_bytes, page_cache_first=config.page_cache_first,
                   short_circuit=config.short_circuit)

    def _count_retry(self) -> None:
        self.stats.retries += 1

    # ---- control plane -------------------------------------------------------------
    def manifest(self) -> tuple[Manifest, dict | None]:
        """The model's manifest and policy (from the tier, else the store), and the data plane set up."""
        if self.data_plane:
            self._connect_plane()
        source = self.rpc
        if self.store is not None and self._plane_info is None:
            source = self.store  # the tier did not answer: the store has the same manifest
        resp = source.unary("GetManifest", common_pb2.ManifestRequest(model=self.model))
        policy = json.loads(resp.policy_json) if resp.policy_json else None
        manifest = Manifest.from_json(resp.manifest_json.encode(), where=f"model {self.model}")
        self.layout, self._manifest = manifest.layout, manifest
        return manifest, policy

    def _connect_plane(self) -> None:
        """Ask the tier where the bytes are; open the store channel and Redis."""
        self._plane_info = None
        try:
            self._plane_info = self.rpc.unary("DataPlane", dram_pb2.DataPlaneRequest(model=self.model,
                                                                                    caller_id=self.caller_id))
        except M2CacheError as err:
            if not self.store_target or err.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                raise
            log.warning("DRAM tier unavailable (%s): reading the store at %s directly", err, self.store_target)
        target = self.store_target or (self._plane_info.store_target if self._plane_info else "")
        if target and self.store is None:
            self.store = grpc_util.Rpc(grpc_util.channel(target), store_pb2_grpc.NeuronStoreStub, "NeuronStore",
                                       self.policy, on_retry=lambda *_: self._count_retry())
        if self._plane_info is not None:
            self._open_redis(self._plane_info)
            self.reporter = self.reporter or Reporter(self._send_report)

    def _open_redis(self, info) -> None:
        key = dataplane.env_or_file(self.mac_key_file, "MAC key") or info.mac_key
        password = dataplane.env_or_file(self.redis_password_file, "Redis password") or info.redis_password or None
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        if info.redis_url and key:
            self.seal = dataplane.RecordSeal(key)
            self.redis = RedisCache(info.redis_url, info.key_prefix, self.redis_timeout_s, password)

    def _send_report(self, current_layer: int, uses: list) -> None:
        shared = self._shared
        self.rpc.stub.Report(dram_pb2.UsageReport(model=self.model, caller_id=self.caller_id,
                                                  current_layer=current_layer, uses=uses,
                                                  page_cache_first=shared is not None and shared.reads_page_cache),
                             timeout=5.0)

    def dense(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Dense tensors by name (all of them when ``names`` is None), streamed in
        bounded chunks (any tensor size) and checked against their crc32."""
        source = self.store or self.rpc
        return assemble_dense(source.stream("StreamDense", common_pb2.DenseRequest(model=self.model,
                                                                                   names=names or [])),
                              self.verify)

    def file(self, filename: str) -> bytes:
        source = self.store or self.rpc
        return source.unary("FetchFile", common_pb2.FileRequest(model=self.model, filename=filename)).data

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.close()
        if self.redis is not None:
            self.redis.close()
        if self._shared is not None:
            self._shared.close()
        if self.store is not None:
            self.store.close()
        self.channel.close()

    # ---- data plane ----------------------------------------------------------------
    def neurons(self, layer: int, prec: Precision, ids: torch.Tensor, current_layer: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Records of ``ids`` [m] -> uint8 [m, record_bytes] (dense), in ids order;
        into ``out`` when given (e.g. the HBM cache's pinned staging buffer)."""
        t0 = time.perf_counter()
        assert self.layout is not None, "manifest() comes before any fetch"
        prec = Precision(prec)
        rb = self.layout.num_bytes(prec)
        m = int(ids.numel())
        if out is None:
            out = torch.empty((m, rb), dtype=torch.uint8, pin_memory=self.pin_memory)
        if out.shape != (m, rb) or out.dtype != torch.uint8:
            raise ValueError(f"out must be uint8 [{m}, {rb}], got {out.dtype} {list(out.shape)}")
        if m:
            ids_np = ids.cpu().numpy().astype(np.int64, copy=False)
            if self.store is None:
                self._through_tier(layer, prec, ids_np, current_layer, out.numpy())
            else:
                self._direct(layer, prec, ids_np, current_layer, out.numpy())
        self.stats.calls += 1
        self.stats.records += m
        self.stats.seconds += time.perf_counter() - t0
        return out

    def _direct(self, layer: int, prec: Precision, ids: np.ndarray, current_layer: int, out: np.ndarray) -> None:
        """Nearest first: the store's page cache (same host), Redis, the store's device."""
        missing = np.ones(ids.size, dtype=bool)
        shared = self._shared_reader()
        if shared is not None:
            shared.resident(layer, prec, ids, out, missing)
        redis = self._usable_redis()
        if redis is not None and missing.any():
            self._from_redis(redis, layer, prec, ids, out, missing)
        miss_rows = np.flatnonzero(missing)
        if miss_rows.size:
            self._from_store(layer, prec, ids, miss_rows, out)
        if self.reporter is not None:
            d_ffn = self._manifest.d_ffn
            self.reporter.add(current_layer, dram_pb2.LayerUse(
                layer=layer, precision=int(prec), used_bits=id_sets.pack(ids, d_ffn),
                missed_bits=id_sets.pack(ids[miss_rows], d_ffn) if miss_rows.size else b""))

    def _from_redis(self, redis: RedisCache, layer: int, prec: Precision, ids: np.ndarray, out: np.ndarray,
                    missing: np.ndarray) -> None:
        """The ``missing`` rows from Redis, about MGET_BYTES a round trip; hits cleared in
        ``missing``. Rows already read elsewhere go through a staging buffer."""
        rows = np.flatnonzero(missing)
        whole = rows.size == ids.size
        sub_ids = ids if whole else ids[rows]
        dest = out if whole else np.empty((rows.size, out.shape[1]), np.uint8)
        left = np.ones(rows.size, dtype=bool)
        keys = redis.keys(self.model, layer, int(prec), sub_ids.tolist())
        group = max(1, MGET_BYTES // self.layout.num_bytes(prec))
        for lo in range(0, rows.size, group):  # bounded round trips: a reply's buffers are held twice
            if not self._redis_hits(redis, keys[lo : lo + group], layer, prec, sub_ids[lo : lo + group],
                                    dest[lo : lo + group], left[lo : lo + group]):
                break
        if not whole:
            hit = ~left
            out[rows[hit]] = dest[hit]
        missing[rows] = left

    def _redis_hits(self, redis: RedisCache, keys, layer: int, prec: Precision, ids: np.ndarray, out: np.ndarray,
                    missing: np.ndarray) -> bool:
        """One MGET of ``keys``; hits placed in ``out`` and cleared in ``missing`` (views of
        the batch's). False when Redis is no use for the rest of the batch."""
        try:
            values = redis.mget(keys)
        except CacheUnavailable as err:
            self._redis_away(err)
            return False
        try:
            missing &= self._place_hits(keys, values, layer, prec, ids, out)
        except dataplane.BadSeal:
            if not self._key_rotated():
                raise
            # a restarted tier (new key, Redis emptied by it): these values are stale, and
            # the store has every record; the next batches read Redis under the new key
            return False
        return True

    def _key_rotated(self) -> bool:
        """Ask the tier for the data plane again after a value failed its MAC: True when the
        sealing key changed (a DRAM tier restarted without a key file), so the failure was
        staleness, not forgery. A key from --mac-key-file never rotates."""
        if self.mac_key_file or self._plane_info is None:
            return False
        try:
            info = self.rpc.unary("DataPlane", dram_pb2.DataPlaneRequest(model=self.model, caller_id=self.caller_id))
        except M2CacheError:
            return False
        if info.mac_key == self._plane_info.mac_key:
            return False
        log.warning("the DRAM tier's record key changed (tier restarted): re-reading under the new key")
        self._plane_info = info
        self._open_redis(info)
        return True

    def _place_hits(self, keys, values, layer, prec, ids, out) -> np.ndarray:
        """Open (MAC), check (CRC) and place Redis hits; returns the still-missing mask."""
        dense = self._manifest.codec == "dense"
        try:  # dense records go straight into their rows of ``out``
            rows, joined, lengths, crcs, checked = dataplane.open_joined(self.seal, keys, values,
                                                                         out if dense else None, self.verify)
        except ChecksumError as err:
            raise type(err)(f"model {self.model} layer {layer} {prec.name}: {err}") from None
        still = np.ones(ids.size, dtype=bool)
        if rows.size:
            if dense:
                if self.verify and not checked:
                    check_rows(out, rows, crcs, ids, prec)
            else:
                self.stats.decode_seconds += place(out, rows, joined, lengths, crcs, self.layout, prec, ids,
                                                   self.verify and not checked)
            nbytes = int(lengths.sum())
            still[rows] = False
            self.stats.redis_records += int(rows.size)
            self.stats.redis_bytes += nbytes
            self.stats.bytes += nbytes
        return still

    def _from_store(self, layer: int, prec: Precision, ids: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """``ids[rows]`` from the store into ``out[rows]``: through the shared region on the
        same host, else streamed chunk by chunk."""
        shared = self._shared_reader()
        if shared is not None:
            try:
                shared.read(layer, prec, ids, rows, out)
                return
            except FailedPrecondition as err:  # the store no longer sees the region: stream from now on
                log.warning("shared-memory reads stopped (%s): misses stream from the store", err)
                self._shared = None
                shared.close()
        req = common_pb2.NeuronBatchRequest(model=self.model, layer=layer, precision=int(prec),
                                            neuron_ids=ids[rows].tolist())
        got = 0
        for batch in self.store.stream("StreamNeurons", req, time.monotonic() + self.deadline_s):
            k = len(batch.crc32c)
            chunk_rows = rows[batch.first : batch.first + k]
            lengths = np.asarray(batch.record_lengths, np.int64) if batch.record_lengths else None
            self.stats.decode_seconds += place(out, chunk_rows, batch.payload, lengths,
                                               np.asarray(batch.crc32c, np.uint32), self.layout, prec, ids,
                                               self.verify)
            got += k
            self.stats.store_bytes += len(batch.payload)
            self.stats.bytes += len(batch.payload)
        if got != rows.size:
            raise ChecksumError(f"layer {layer} {prec.name}: the store sent {got} of {rows.size} records")
        self.stats.store_records += got

    def _shared_reader(self) -> SameHostStore | None:
        """This worker's region, registered with the store at the first fetch; None where the
        store cannot see it (another host) or none can be made."""
        with self._shared_lock:
            if self._shared is None and not self._shared_tried and self.shared_memory_bytes > 0 and self.store:
                self._shared_tried = True
                self._shared = SameHostStore.open(self.store, self.model, self.layout, self._manifest.d_ffn,
                                                  self._manifest.codec == "dense", self.shared_memory_bytes,
                                                  self.deadline_s, self.verify, self.stats, self.page_cache_first,
                                                  self.short_circuit)
            return self._shared

    def _usable_redis(self) -> RedisCache | None:
        if self.redis is None and self._plane_info is None:
            return None
        if time.monotonic() < self._redis_down_until:
            return None
        if self.redis is None:  # away earlier: ask the tier again, briefly (it may have a new Redis)
            try:
                info = self.rpc.stub.DataPlane(dram_pb2.DataPlaneRequest(model=self.model, caller_id=self.caller_id),
                                               timeout=0.25)
                self._open_redis(info)
            except (grpc.RpcError, M2CacheError) as err:
                log.debug("DRAM tier still away: %s", err)
            if self.redis is None:
                self._redis_down_until = time.monotonic() + self.redis_retry_s
        return self.redis

    def _redis_away(self, err: Exception) -> None:
        log.warning("Redis unavailable (%s): reading the store for %.1fs", err, self.redis_retry_s)
        self._redis_down_until = time.monotonic() + self.redis_retry_s
        if self.redis is not None:
            self.redis.close()
        self.redis = None

    def _through_tier(self, layer: int, prec: Precision, ids: np.ndarray, current_layer: int,
                      out: np.ndarray) -> None:
        """No data plane: one FetchNeurons of the tier (it reads Redis and the store)."""
        req = dram_pb2.DramFetchRequest(
            batch=common_pb2.NeuronBatchRequest(model=self.model, layer=layer, neuron_ids=ids.tolist(),
                                                precision=int(prec)),
            current_layer=current_layer, caller_id=self.caller_id)
        resp = self.rpc.unary("FetchNeurons", req)
        lengths = np.asarray(resp.record_lengths, np.int64) if resp.record_lengths else None
        if len(resp.crc32c) != ids.size:
            raise ChecksumError(f"layer {layer} {prec.name}: {len(resp.crc32c)} checksums for {ids.size} records")
        self.stats.decode_seconds += place(out, np.arange(ids.size), resp.payload, lengths,
                                           np.asarray(resp.crc32c, np.uint32), self.layout, prec, ids, self.verify)
        self.stats.bytes += len(resp.payload)

