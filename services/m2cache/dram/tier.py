"""DramTier: read-through Redis cache of neuron records in front of the
NeuronStore, steered by :class:`LayerAwarePolicy`.

Per fetch: one Redis MGET for the records the policy believes resident, each
verified against the store's crc32; one batched NeuronStore call for the rest,
written back in one pipeline when the policy admits them. Whole layers are
preloaded on a small thread pool. If Redis goes away every fetch is served
from the store and a prober thread brings Redis back into use (emptied and
re-pinned) once it answers again.

Bitmap stores (codec/bitmap.py): records are cached and served as stored
(compressed, variable-size); the budget counts each at the store's largest
stored record size at its precision, so Redis never holds more than the budget.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from m2cache.codec.bitmap import length_ok
from m2cache.codec.checksum import crc32c as crc32
from m2cache.codec.format import Manifest, Precision
from m2cache.dram.cache import CacheUnavailable, RedisCache
from m2cache.dram.config import DramConfig
from m2cache.dram.policy import LayerAwarePolicy, UnitKey
from m2cache.dram.stats import TierStats
from m2cache.dram.store_client import StoreClient
from m2cache.errors import ChecksumError, InvalidArgument
from m2cache.store.catalog import check_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FetchRequest:
    model: str
    layer: int
    precision: int
    neuron_ids: Sequence[int]
    all_neurons: bool = False
    current_layer: int = 0
    caller_id: str = ""


@dataclass(frozen=True, slots=True)
class Batch:
    neuron_ids: list[int]
    record_bytes: int
    payload: bytes
    crc32: list[int]
    codec: str = "dense"
    record_lengths: list[int] = field(default_factory=list)  # codec "bitmap": stored length per record


class DramTier:
    """The domain object behind the DramTier service (no gRPC server code)."""

    def __init__(self, config: DramConfig, store: StoreClient, cache: RedisCache, stats: TierStats,
                 on_redis_state: Callable[[bool], None] = lambda up: None):
        self.config = config
        self.store = store
        self.cache = cache
        self.stats = stats
        self.policy = LayerAwarePolicy(config.budget_bytes, config.num_pinned_layers, config.preload_ahead,
                                       config.caller_ttl_s)
        self._precisions: dict[str, tuple[Precision, ...]] = {}  # model -> precisions pinned/preloaded
        self.on_redis_state = on_redis_state
        self.redis_up = False
        self._run_id = ""
        self._manifests: dict[str, Manifest] = {}
        self._crcs: dict[UnitKey, np.ndarray] = {}   # [d_ffn] uint32 per unit, filled as records arrive
        self._inflight: set[UnitKey] = set()
        self._lock = threading.Lock()                  # manifests, crc tables, in-flight preloads
        self._write_lock = threading.Lock()            # serialises reserve + Redis write: Redis never over budget
        self._pool = ThreadPoolExecutor(config.preload_workers, thread_name_prefix="preload")
        self._stop = threading.Event()
        self._prober = threading.Thread(target=self._probe_loop, name="redis-probe", daemon=True)
        stats.budget_bytes.set(config.budget_bytes)

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Learn the store's models, take Redis into use (pinning layers), start probing."""
        deadline = time.monotonic() + self.config.store_timeout_s
        for model in self.store.list_models(deadline):
            self.manifest(model, deadline)
        self._probe_once()
        self._prober.start()

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._prober.is_alive():
            self._prober.join()

    # ---- models --------------------------------------------------------------
    def manifest(self, model: str, deadline: float) -> Manifest:
        """The model's manifest (fetched from the store once); NotFound for unknown models."""
        found = self._manifests.get(model)
        if found is None:
            raw = self.store.manifest(model, deadline)
            found = Manifest.from_json(raw.manifest_json.encode(), where=f"model {model!r}")
            policy = json.loads(raw.policy_json) if raw.policy_json else None
            with self._lock:
                self._precisions[model] = self.config.precisions(policy)
                self._manifests[model] = found
            self.policy.register_model(model, found.num_layers)
            if self.redis_up:
                self._pin(model)
        return found

    def _crc_table(self, key: UnitKey) -> np.ndarray:
        table = self._crcs.get(key)
        if table is None:
            with self._lock:
                table = self._crcs.setdefault(key, np.zeros(self._manifests[key.model].d_ffn, dtype=np.uint32))
        return table

    # ---- fetch ---------------------------------------------------------------
    def fetch(self, req: FetchRequest, deadline: float) -> Batch:
        """Records of ``req`` in request order, byte-identical to the store's."""
        manifest = self.manifest(req.model, deadline)
        prec, ids = self._validate(req, manifest)
        size, codec = manifest.layout.num_bytes(prec), manifest.codec
        key = UnitKey(req.model, req.layer, int(prec))
        self._schedule_window(req.caller_id, req.model, req.current_layer)
        if key in self._inflight and not self.policy.is_pinned(req.layer):
            self.stats.event("preload_miss")
        records = self._from_redis(key, ids, size, codec)
        hits = sum(r is not None for r in records)
        missing = [nid for nid, r in zip(ids, records) if r is None]
        fetched = self._from_store(key, missing, manifest, deadline) if missing else {}
        parts = [r if r is not None else fetched[nid] for nid, r in zip(ids, records)]
        payload = b"".join(parts)
        table = self._crc_table(key)
        hit_bytes = sum(len(r) for r in records if r is not None)
        self.stats.served(req.model, req.layer, hits, len(missing), hit_bytes, len(payload) - hit_bytes)
        lengths = [len(p) for p in parts] if codec != "dense" else []
        return Batch(ids, size, payload, table[ids].tolist() if ids else [], codec, lengths)

    def _validate(self, req: FetchRequest, manifest: Manifest) -> tuple[Precision, list[int]]:
        prec = Precision.parse(req.precision)
        num_layers, d_ffn = manifest.num_layers, manifest.d_ffn
        for what, layer in (("layer", req.layer), ("current_layer", req.current_layer)):
            if not 0 <= layer < num_layers:
                raise InvalidArgument(f"{what} {layer} out of range: model {req.model!r} has {num_layers} layers")
        ids = list(range(d_ffn)) if req.all_neurons else list(req.neuron_ids)
        check_batch(len(ids), manifest.layout.num_bytes(prec), self.config.max_batch_ids,
                    self.config.max_payload_bytes)
        bad = [n for n in ids if not 0 <= n < d_ffn]
        if bad:
            raise InvalidArgument(f"neuron id {bad[0]} out of range: layers of {req.model!r} have {d_ffn} neurons")
        return prec, ids

    def _from_redis(self, key: UnitKey, ids: list[int], size: int, codec: str) -> list[bytes | None]:
        """Verified Redis hits (None elsewhere); one MGET of the believed-resident ids."""
        records: list[bytes | None] = [None] * len(ids)
        if not self.redis_up:
            return records
        idx = [i for i, r in enumerate(self.policy.resident(key, ids)) if r]
        if not idx:
            return records
        try:
            values = self.cache.mget(self.cache.keys(key.model, key.layer, key.prec, [ids[i] for i in idx]))
        except CacheUnavailable as err:
            self._redis_lost(err)
            return records
        table = self._crc_table(key)
        lost = []
        for i, value in zip(idx, values):
            nid = ids[i]
            if value is not None and length_ok(len(value), size, codec) and (not self.config.verify_redis
                                                             or crc32(value) == table[nid]):
                records[i] = value
                continue
            lost.append(nid)
            if value is not None:
                log.warning("Redis record %s neuron %d fails its checksum; refetching", key, nid)
                self.stats.event("checksum_refetch")
        if lost:
            self.policy.forget(key, lost)
        return records

    def _from_store(self, key: UnitKey, neuron_ids: list[int], manifest: Manifest,
                    deadline: float) -> dict[int, memoryview]:
        """Records of ``neuron_ids`` from the NeuronStore (verified), written back if admitted."""
        unique = list(dict.fromkeys(neuron_ids))
        prec = Precision(key.prec)
        payloads, crcs, lengths = self.store.fetch_neurons(key.model, key.layer, key.prec, unique, deadline)
        records = _split_verified(key, unique, payloads, crcs, manifest.layout.num_bytes(prec), lengths)
        table = self._crc_table(key)
        table[unique] = crcs
        self._admit(key, records, manifest.stored_record_bytes(prec), pinned=False)
        return records

    # ---- admission and preloading -------------------------------------------
    def _admit(self, key: UnitKey, records: dict[int, memoryview], size: int, pinned: bool) -> bool:
        """Reserve room and write ``records`` to Redis in one round trip (evictions first)."""
        with self._write_lock:
            if not self.redis_up:
                return False
            reservation = self.policy.reserve(key, records.keys(), size, pinned=pinned)
            if reservation is None:
                return False
            deletes = [k for unit, nids in reservation.evicted
                       for k in self.cache.keys(unit.model, unit.layer, unit.prec, nids)]
            new_keys = self.cache.keys(key.model, key.layer, key.prec, reservation.neuron_ids)
            items = [(k, records[nid]) for k, nid in zip(new_keys, reservation.neuron_ids)]
            try:
                self.cache.write(items, deletes)
            except CacheUnavailable as err:
                self.policy.commit(reservation, ok=False)
                self._redis_lost(err)
                return False
            self.policy.commit(reservation)
            self.stats.resident_bytes.set(self.policy.bytes_resident)
            return True

    def _schedule_window(self, caller_id: str, model: str, current_layer: int) -> None:
        for layer in self.policy.observe(caller_id, model, current_layer):
            for prec in self._precisions[model]:
                self._submit(UnitKey(model, layer, int(prec)), caller_id, pinned=False)

    def _pin(self, model: str) -> None:
        num_layers = self._manifests[model].num_layers
        for layer in range(min(self.config.num_pinned_layers, num_layers)):
            for prec in self._precisions[model]:
                self._submit(UnitKey(model, layer, int(prec)), "", pinned=True)

    def _submit(self, key: UnitKey, caller_id: str, pinned: bool) -> None:
        if not self.redis_up or self._stop.is_set():
            return
        with self._lock:
            if key in self._inflight or self.policy.num_resident(key) == self._manifests[key.model].d_ffn:
                return
            self._inflight.add(key)
        self._pool.submit(self._preload, key, caller_id, pinned)

    def _preload(self, key: UnitKey, caller_id: str, pinned: bool) -> None:
        """Load the whole unit from the store into Redis, a chunk at a time."""
        try:
            manifest = self._manifests[key.model]
            size = manifest.stored_record_bytes(Precision(key.prec))  # budget per record
            deadline = time.monotonic() + self.config.store_timeout_s
            step = self.config.store_chunk_ids
            for lo in range(0, manifest.d_ffn, step):
                if self._stop.is_set():
                    return
                chunk = range(lo, min(lo + step, manifest.d_ffn))
                todo = [n for n, r in zip(chunk, self.policy.resident(key, chunk)) if not r]
                if not todo:
                    continue
                if not self.policy.can_admit(key, len(todo), size, pinned):  # no room: skip the I/O too
                    self.stats.event("preload_skipped")
                    return
                payloads, crcs, lengths = self.store.fetch_neurons(key.model, key.layer, key.prec, todo, deadline)
                records = _split_verified(key, todo, payloads, crcs, manifest.layout.num_bytes(Precision(key.prec)),
                                          lengths)
                self._crc_table(key)[todo] = crcs
                if not self._admit(key, records, size, pinned):
                    self.stats.event("preload_skipped")
                    return
                self.stats.preloaded(sum(len(r) for r in records.values()))
            self.stats.preload_done(None if pinned else self._lead(key, caller_id))
        except Exception:  # a failed preload only costs hits later; never the server
            log.warning("preload of %s failed", key, exc_info=True)
        finally:
            with self._lock:
                self._inflight.discard(key)

    def _lead(self, key: UnitKey, caller_id: str) -> int | None:
        """Layers between the preloaded layer and its caller's layer on arrival; negative if passed."""
        current = self.policy.caller_layer(caller_id)
        if current is None:
            return None
        num_layers = self._manifests[key.model].num_layers
        steps = (key.layer - current) % num_layers
        return steps if steps <= self.config.preload_ahead else steps - num_layers

    # ---- Redis liveness ------------------------------------------------------
    def _redis_lost(self, err: Exception) -> None:
        if self.redis_up:
            log.warning("Redis unavailable (%s): serving from the NeuronStore", err)
            self.redis_up = False
            self.stats.redis_up.set(0)
            self.on_redis_state(False)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.config.redis_probe_interval_s):
            self._probe_once()

    def _probe_once(self) -> None:
        """Mark Redis down if it does not answer; on (re)connect or restart, empty
        our keys, reset the policy, and pin again."""
        try:
            run_id = self.cache.run_id()
            if self.redis_up and run_id == self._run_id:
                return
            with self._write_lock:
                self.policy.clear()
                removed = self.cache.delete_all()
                self._run_id = run_id
                self.redis_up = True
        except CacheUnavailable as err:
            self._redis_lost(err)
            return
        log.info("Redis in use (run_id %s, %d stale keys removed)", run_id[:8], removed)
        self.stats.redis_up.set(1)
        self.stats.resident_bytes.set(0)
        self.on_redis_state(True)
        for model in list(self._manifests):
            self._pin(model)


def _split_verified(key: UnitKey, neuron_ids: list[int], payloads: list[bytes], crcs: list[int],
                    size: int, lengths: list[int] | None = None) -> dict[int, memoryview]:
    """Zero-copy views of each record of the store's payloads, crc-checked.
    Records are ``size`` bytes each, or ``lengths[i]`` bytes (bitmap stores)."""
    views = [memoryview(p) for p in payloads]
    if lengths and len(lengths) != len(neuron_ids):
        raise ChecksumError(f"NeuronStore sent {len(lengths)} record lengths for {len(neuron_ids)} ids of {key}")
    records = {}
    i = 0
    for view in views:
        if not lengths and len(view) % size:
            raise ChecksumError(f"NeuronStore payload for {key} is not a whole number of records")
        off = 0
        while off < len(view):
            if i >= len(neuron_ids):
                raise ChecksumError(f"NeuronStore payload for {key} holds more than {len(neuron_ids)} records")
            n = lengths[i] if lengths else size
            rec = view[off : off + n]
            off += n
            if len(rec) != n or crc32(rec) != crcs[i]:
                raise ChecksumError(f"record {key} neuron {neuron_ids[i]} from the store fails its checksum")
            records[neuron_ids[i]] = rec
            i += 1
    if i != len(neuron_ids):
        raise ChecksumError(f"NeuronStore returned {i} records for {len(neuron_ids)} ids of {key}")
    return records
