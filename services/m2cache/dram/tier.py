"""DramTier: the control plane of the DRAM tier (what Redis holds), plus a
read-through path for clients that do not read Redis themselves.

Workers read Redis directly (dram/dataplane.py: sealed values, one MGET per
layer and precision) and stream their misses from the NeuronStore; they report
what they used (``report``). What the tier keeps follows those reports:

- a worker's misses are admitted (read from the store, sealed, written back);
- layers ``current + 1 .. + preload_ahead`` are preloaded with the neurons the
  workers last used there (``preload="used"``, the default), or whole
  (``preload="layer"``, M2Cache's original policy);
- the first ``num_pinned_layers`` layers are pinned (never evicted);
- eviction by next-use distance under the byte budget (policy.py).

All of it runs on a small thread pool: no worker ever waits on the tier. If
Redis goes away every read is served from the store and a prober brings Redis
back into use (emptied and re-pinned) once it answers again.

Bitmap stores (codec/bitmap.py): records are cached and served as stored;
the budget counts each at the store's largest stored record size plus the
seal's header, so Redis never holds more than the budget.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from m2cache.codec.bitmap import length_ok
from m2cache.codec.checksum import concat, crc32c
from m2cache.codec.format import Manifest, Precision
from m2cache.dram.cache import CacheUnavailable, RedisCache
from m2cache.dram.config import DramConfig
from m2cache.dram.dataplane import HEADER_BYTES, RecordSeal
from m2cache.dram.policy import LayerAwarePolicy, UnitKey
from m2cache.dram.requests import Batch, FetchRequest, LayerUse
from m2cache.dram.stats import TierStats
from m2cache.dram.store_client import StoreClient
from m2cache.errors import ChecksumError, InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)


class DramTier:
    """The domain object behind the DramTier service (no gRPC server code)."""

    def __init__(self, config: DramConfig, store: StoreClient, cache: RedisCache, stats: TierStats,
                 seal: RecordSeal, on_redis_state: Callable[[bool], None] = lambda up: None):
        self.config = config
        self.store = store
        self.cache = cache
        self.stats = stats
        self.seal = seal
        self.policy = LayerAwarePolicy(config.budget_bytes, config.num_pinned_layers, config.preload_ahead,
                                       config.caller_ttl_s)
        self._precisions: dict[str, tuple[Precision, ...]] = {}  # model -> precisions pinned/preloaded
        self.on_redis_state = on_redis_state
        self.redis_up = False
        self.run_id = ""
        self._manifests: dict[str, Manifest] = {}
        self._used: dict[UnitKey, np.ndarray] = {}     # ids a worker last used per unit (preload="used")
        self._pending: dict[UnitKey, tuple[set[int], bool, str]] = {}  # ids to load per unit, pinned, caller
        self._inflight: set[UnitKey] = set()
        self._lock = threading.Lock()                  # manifests, usage, pending loads
        self._write_lock = threading.Lock()            # serialises reserve + Redis write: Redis never over budget
        self._pool = ThreadPoolExecutor(config.preload_workers, thread_name_prefix="preload")
        # preload="used" never evicts to admit: a full tier keeps what it has rather than
        # re-reading from the SSD records it would evict again before their next use (so the
        # stack reads no more from the SSD than the workers' misses); "layer" evicts by distance.
        self._evicts = config.preload == "layer"
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

    def _slot_bytes(self, manifest: Manifest, prec: Precision) -> int:
        """Budget per record: its largest stored size plus the seal's header."""
        return manifest.stored_record_bytes(prec) + HEADER_BYTES

    # ---- the read-through path (FetchNeurons) ----------------------------------
    def fetch(self, req: FetchRequest, deadline: float) -> Batch:
        """Records of ``req`` in request order, byte-identical to the store's."""
        manifest = self.manifest(req.model, deadline)
        prec, ids = self._validate(req, manifest)
        size, codec = manifest.layout.num_bytes(prec), manifest.codec
        key = UnitKey(req.model, req.layer, int(prec))
        self._observe(req.caller_id, req.model, req.current_layer)
        if key in self._inflight and not self.policy.is_pinned(req.layer):
            self.stats.event("preload_miss")
        records, crcs = self._from_redis(key, ids, size, codec)
        hit = [r is not None for r in records]
        hit_bytes = sum(len(r) for r, h in zip(records, hit) if h)
        missing = [nid for nid, h in zip(ids, hit) if not h]
        if missing:
            fetched = self._from_store(key, missing, manifest, deadline)
            for i, nid in enumerate(ids):
                if not hit[i]:
                    records[i], crcs[i] = fetched[nid]
        payload = b"".join(records)
        self.stats.served(req.model, req.layer, len(ids) - len(missing), len(missing), hit_bytes,
                          len(payload) - hit_bytes)
        lengths = [len(r) for r in records] if codec != "dense" else []
        return Batch(ids, size, payload, crcs, codec, lengths)

    def _validate(self, req: FetchRequest, manifest: Manifest) -> tuple[Precision, list[int]]:
        prec = Precision.parse(req.precision)
        num_layers, d_ffn = manifest.num_layers, manifest.d_ffn
        for what, layer in (("layer", req.layer), ("current_layer", req.current_layer)):
            if not 0 <= layer < num_layers:
                raise InvalidArgument(f"{what} {layer} out of range: model {req.model!r} has {num_layers} layers")
        ids = list(range(d_ffn)) if req.all_neurons else list(req.neuron_ids)
        size = manifest.layout.num_bytes(prec)
        if len(ids) > self.config.max_batch_ids:
            raise ResourceExhausted(f"batch of {len(ids)} neuron ids exceeds the limit of "
                                    f"{self.config.max_batch_ids}; split it")
        if len(ids) * size > self.config.max_payload_bytes:
            raise ResourceExhausted(f"batch of {len(ids)} records x {size} B exceeds the "
                                    f"{self.config.max_payload_bytes}-byte payload limit; split it")
        bad = [n for n in ids if not 0 <= n < d_ffn]
        if bad:
            raise InvalidArgument(f"neuron id {bad[0]} out of range: layers of {req.model!r} have {d_ffn} neurons")
        return prec, ids

    def _from_redis(self, key: UnitKey, ids: list[int], size: int, codec: str
                    ) -> tuple[list[memoryview | None], list[int]]:
        """Verified Redis hits (None elsewhere) and their crc32c; one MGET of the believed-resident ids."""
        records: list[memoryview | None] = [None] * len(ids)
        crcs = [0] * len(ids)
        if not self.redis_up:
            return records, crcs
        idx = [i for i, r in enumerate(self.policy.resident(key, ids)) if r]
        if not idx:
            return records, crcs
        rkeys = self.cache.keys(key.model, key.layer, key.prec, [ids[i] for i in idx])
        try:
            values = self.cache.mget(rkeys)
        except CacheUnavailable as err:
            self._redis_lost(err)
            return records, crcs
        lost = []
        for i, rkey, value in zip(idx, rkeys, values):
            if value is not None:
                try:
                    rec, crc = self.seal.open(rkey, value)
                    if length_ok(len(rec), size, codec) and (not self.config.verify_redis or crc32c(rec) == crc):
                        records[i], crcs[i] = rec, crc
                        continue
                except ChecksumError:
                    pass
                log.warning("Redis record %s neuron %d fails its MAC or checksum; refetching", key, ids[i])
                self.stats.event("checksum_refetch")
            lost.append(ids[i])
        if lost:
            self.policy.forget(key, lost)
        return records, crcs

    def _from_store(self, key: UnitKey, neuron_ids: list[int], manifest: Manifest, deadline: float
                    ) -> dict[int, tuple[memoryview, int]]:
        """Records of ``neuron_ids`` from the NeuronStore (verified), written back if admitted."""
        unique = list(dict.fromkeys(neuron_ids))
        records = self._read_store(key, unique, manifest, deadline)
        self._admit(key, records, self._slot_bytes(manifest, Precision(key.prec)), pinned=self.policy.is_pinned(key.layer))
        return records

    def _read_store(self, key: UnitKey, ids: list[int], manifest: Manifest, deadline: float
                    ) -> dict[int, tuple[memoryview, int]]:
        """neuron id -> (record as stored, crc32c), streamed from the store and CRC-checked."""
        size = manifest.layout.num_bytes(Precision(key.prec))
        out: dict[int, tuple[memoryview, int]] = {}
        for batch in self.store.stream_neurons(key.model, key.layer, key.prec, ids, deadline):
            view, lengths = memoryview(batch.payload), list(batch.record_lengths)
            crcs = np.asarray(batch.crc32c, dtype=np.uint32)
            if crc32c(batch.payload) != concat(crcs, lengths if lengths else size):  # one pass per chunk
                raise ChecksumError(f"records of {key} from the store fail their checksums")
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist() if lengths else None
            for j, (nid, crc) in enumerate(zip(batch.neuron_ids, crcs.tolist())):
                rec = view[starts[j] : starts[j] + lengths[j]] if lengths else view[j * size : (j + 1) * size]
                out[nid] = (rec, crc)
        if len(out) != len(set(ids)):
            raise ChecksumError(f"NeuronStore returned {len(out)} records for {len(set(ids))} ids of {key}")
        return out

    # ---- the control plane: usage reports, admission, preloading ----------------
    def report(self, model: str, caller_id: str, current_layer: int, uses: Sequence[LayerUse],
               page_cache_first: bool = False) -> None:
        """A worker's usage of some layers: admit its misses, remember what it used,
        schedule the preloads ahead of it. Returns at once (the work is queued).
        ``page_cache_first``: the worker reads the store's page cache before Redis (it
        is on the store's host), so Redis need hold nothing for it: its misses are not
        admitted nor layers preloaded ahead of it, and it does not steer eviction; what
        it used still counts for the layers' preloads for other workers."""
        manifest = self._manifests.get(model) or self.manifest(model, time.monotonic() + self.config.store_timeout_s)
        self.stats.event("report")
        for use in uses:
            key = UnitKey(model, use.layer, int(Precision.parse(use.precision)))
            used = np.asarray(use.used_ids, dtype=np.int64)
            if used.size and (used.min() < 0 or used.max() >= manifest.d_ffn):
                raise InvalidArgument(f"neuron id out of range in a report for {key}")
            with self._lock:
                self._used[key] = used
            if page_cache_first:
                continue
            self.policy.resident(key, ())  # touch: the unit is in use
            if len(use.missed_ids):
                self._submit(key, use.missed_ids, pinned=self.policy.is_pinned(use.layer))
        if 0 <= current_layer < manifest.num_layers and not page_cache_first:
            self._observe(caller_id, model, current_layer)

    def _observe(self, caller_id: str, model: str, current_layer: int) -> None:
        """Where a caller is; queue the layers ahead of it."""
        d_ffn = self._manifests[model].d_ffn
        for layer in self.policy.observe(caller_id, model, current_layer):
            if self.config.preload == "layer":
                for prec in self._precisions[model]:
                    self._submit(UnitKey(model, layer, int(prec)), range(d_ffn), pinned=False, caller_id=caller_id)
                continue
            for prec in Precision:  # "used": every precision workers used there, whatever the policy says
                key = UnitKey(model, layer, int(prec))
                with self._lock:
                    used = self._used.get(key)
                if used is not None and used.size:
                    self._submit(key, used.tolist(), pinned=False, caller_id=caller_id)

    def _pin(self, model: str) -> None:
        """preload="layer": the first layers whole; "used": pinned as workers use them."""
        if self.config.preload != "layer":
            return
        manifest = self._manifests[model]
        for layer in range(min(self.config.num_pinned_layers, manifest.num_layers)):
            for prec in self._precisions[model]:
                self._submit(UnitKey(model, layer, int(prec)), range(manifest.d_ffn), pinned=True)

    def _submit(self, key: UnitKey, ids, pinned: bool, caller_id: str = "") -> None:
        """Queue ``ids`` of ``key`` for loading (merged with what is queued already)."""
        if not self.redis_up or self._stop.is_set():
            return
        with self._lock:
            wanted, was_pinned, caller = self._pending.get(key, (set(), False, caller_id))
            wanted.update(int(i) for i in ids)
            self._pending[key] = (wanted, pinned or was_pinned, caller or caller_id)
            if key in self._inflight:
                return
            self._inflight.add(key)
        self._pool.submit(self._drain, key)

    def _drain(self, key: UnitKey) -> None:
        """Load the unit's queued ids from the store into Redis, a chunk at a time."""
        try:
            while not self._stop.is_set():
                with self._lock:
                    wanted, pinned, caller = self._pending.pop(key, (set(), False, ""))
                    if not wanted:
                        self._inflight.discard(key)
                        return
                if self._load(key, sorted(wanted), pinned):
                    self.stats.preload_done(None if pinned or not caller else self._lead(key, caller))
        except Exception:  # a failed load only costs hits later; never the server
            log.warning("loading %s failed", key, exc_info=True)
        with self._lock:
            self._pending.pop(key, None)
            self._inflight.discard(key)

    def _load(self, key: UnitKey, ids: list[int], pinned: bool) -> bool:
        """Read the records of ``ids`` not yet resident and admit them; False when the budget had no room."""
        manifest = self._manifests[key.model]
        slot = self._slot_bytes(manifest, Precision(key.prec))
        deadline = time.monotonic() + self.config.store_timeout_s
        for lo in range(0, len(ids), self.config.store_chunk_ids):
            chunk = ids[lo : lo + self.config.store_chunk_ids]
            todo = [n for n, r in zip(chunk, self.policy.resident(key, chunk)) if not r]
            if not todo:
                continue
            if not self.policy.can_admit(key, len(todo), slot, pinned, self._evicts):  # no room: skip the I/O
                self.stats.event("preload_skipped")
                return False
            records = self._read_store(key, todo, manifest, deadline)
            if not self._admit(key, records, slot, pinned):
                self.stats.event("preload_skipped")
                return False
            self.stats.preloaded(sum(len(r) for r, _ in records.values()))
        return True

    def _lead(self, key: UnitKey, caller_id: str) -> int | None:
        """Layers between the loaded layer and its caller's layer on arrival; negative if passed."""
        current = self.policy.caller_layer(caller_id)
        if current is None:
            return None
        steps = (key.layer - current) % self._manifests[key.model].num_layers
        return steps if steps <= self.config.preload_ahead else steps - self._manifests[key.model].num_layers

    def _admit(self, key: UnitKey, records: dict[int, tuple[memoryview, int]], size: int, pinned: bool) -> bool:
        """Reserve room and write sealed ``records`` to Redis in one round trip (evictions first)."""
        with self._write_lock:
            if not self.redis_up:
                return False
            reservation = self.policy.reserve(key, records.keys(), size, pinned=pinned, evict=self._evicts)
            if reservation is None:
                return False
            deletes = [k for unit, nids in reservation.evicted
                       for k in self.cache.keys(unit.model, unit.layer, unit.prec, nids)]
            new_keys = self.cache.keys(key.model, key.layer, key.prec, reservation.neuron_ids)
            items = [(k, self.seal.seal(k, *records[nid])) for k, nid in zip(new_keys, reservation.neuron_ids)]
            try:
                self.cache.write(items, deletes)
            except CacheUnavailable as err:
                self.policy.commit(reservation, ok=False)
                self._redis_lost(err)
                return False
            self.policy.commit(reservation)
            self.stats.resident_bytes.set(self.policy.bytes_resident)
            return True

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
            if self.redis_up and run_id == self.run_id:
                return
            with self._write_lock:
                self.policy.clear()
                removed = self.cache.delete_all()
                self.run_id = run_id
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
