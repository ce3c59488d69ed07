"""The NeuronStore on this worker's host: its records file read here, or its reads into a region.

Where the store shares a model's records file (a dense store, by default), this worker
reads it itself (worker/short_circuit.py: the page cache's records with no round trip,
then the device's), exactly as an in-process run does. Otherwise, through a shared-memory
region (store/shared.py: a memfd registered on the store's socket, which the store unmaps
when this process's connection closes, however it ends), two reads, both one Unix-socket
round trip per region's worth:
- ``resident``: what the store's page cache already holds, never waiting on the device
  (preadv2 RWF_NOWAIT in the store; a page it finds missing may start the kernel's
  readahead, so a cold sequential read is partly served from the page cache). On one host the page cache is DRAM too, and the
  nearest copy: it costs one copy into the region, where a Redis hit costs a TCP round
  trip, Redis's own copy and a MAC check per record. What it cannot serve goes on to
  Redis. When a read finds nothing resident (a cold store, or one whose pages the DRAM
  tier's Redis holds instead), resident reads pause for ``RESIDENT_RETRY_S``; when the
  store fails one (gone, restarting), for ``AWAY_RETRY_S``, and Redis serves meanwhile.
- ``read``: the misses, read by the store from its device into the region.
Where the store cannot see the region (another host) none of this is offered: ``open``
returns None and the fetcher streams.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from m2cache.codec.format import Precision, RecordLayout
from m2cache.errors import ChecksumError, DeadlineExceeded, FailedPrecondition, M2CacheError, Unavailable
from m2cache.store.shared_reader import SharedReader
from m2cache.worker.records import check_rows, place
from m2cache.worker.short_circuit import LocalRecords
from m2cache_client.pb import common_pb2

log = logging.getLogger(__name__)
RESIDENT_RETRY_S = 1.0  # after a resident read that found nothing, how long to go straight to Redis
AWAY_RETRY_S = 10.0  # after the store failed a resident read (gone, restarting): Redis and the rest serve


class SameHostStore:
    """One worker's region with the store, and its records file when the store shares it
    (``local``); ``stats`` is the fetcher's FetchStats."""

    def __init__(self, reader: SharedReader, model: str, layout: RecordLayout, dense: bool, verify: bool, stats,
                 resident_reads: bool = True, local: LocalRecords | None = None):
        self.reader = reader
        self.local = local
        self.model = model
        self.layout = layout
        self.verify = verify
        self.stats = stats
        self.resident_reads = resident_reads and dense  # bitmap records: the page cache holds stored, not dense, form
        self._resident_after = 0.0

    @classmethod
    def open(cls, store_rpc, model: str, layout: RecordLayout, d_ffn: int, dense: bool, capacity: int,
             deadline_s: float, verify: bool, stats, resident_reads: bool = True, short_circuit: bool = True
             ) -> "SameHostStore | None":
        try:
            reader = SharedReader(store_rpc, max(capacity, layout.num_bytes(Precision.FULL)), deadline_s)
        except (OSError, M2CacheError) as err:
            log.info("no shared memory with the store (%s): misses stream", err)
            return None
        local = LocalRecords.open(reader, model, layout, d_ffn, verify) if short_circuit and dense else None
        if local is None:
            log.info("misses land in shared region %s (%s, %d KiB)", reader.ref.name,
                     "a memfd" if reader.region.anonymous else reader.region.path, reader.capacity >> 10)
        return cls(reader, model, layout, dense, verify, stats, resident_reads, local)

    @property
    def reads_page_cache(self) -> bool:
        """Whether fetches read the page cache here first now (not paused): then Redis
        need hold nothing for this worker (the DRAM tier is told in its reports)."""
        return self.resident_reads and time.monotonic() >= self._resident_after

    def _request(self, layer: int, prec: Precision, ids: np.ndarray) -> common_pb2.NeuronBatchRequest:
        return common_pb2.NeuronBatchRequest(model=self.model, layer=layer, precision=int(prec),
                                             neuron_ids=ids.tolist())

    def _step(self, prec: Precision) -> int:
        return max(1, self.reader.capacity // self.layout.num_bytes(prec))

    def resident(self, layer: int, prec: Precision, ids: np.ndarray, out: np.ndarray, missing: np.ndarray) -> None:
        """The records of ``ids`` that the store's page cache holds: read into their rows of
        ``out`` and cleared in ``missing``; the others are left for the next tier."""
        if not ids.size or not self.reads_page_cache:
            return
        if self.local is not None:
            self._resident_here(layer, prec, ids, out, missing)
            return
        rb = self.layout.num_bytes(prec)
        step, served = self._step(prec), 0

        def consume(lo: int, data: np.ndarray, resp) -> int:
            if resp.resident_unsupported:
                log.info("the store cannot read its page cache alone: misses go to Redis")
                self.resident_reads = False
                return 0
            n = data.size // rb
            records = data.reshape(n, rb)
            if not resp.absent:  # all here: one copy
                got, crcs = np.arange(lo, lo + n), np.asarray(resp.crc32c, np.uint32)
                out[lo : lo + n] = records
            else:
                here = np.ones(n, dtype=bool)
                here[np.asarray(resp.absent, dtype=np.int64)] = False
                got, crcs = lo + np.flatnonzero(here), np.asarray(resp.crc32c, np.uint32)[here] if resp.crc32c else None
                out[got] = records[here]
            if got.size:
                if self.verify and not resp.verified:
                    check_rows(out, got, crcs, ids, prec)
                missing[got] = False
            return int(got.size)

        for lo in range(0, ids.size, step):
            request = self._request(layer, prec, ids[lo : lo + step])
            try:
                got = self.reader.read(request, lambda data, resp: consume(lo, data, resp), resident_only=True)
            except (Unavailable, DeadlineExceeded, FailedPrecondition) as err:  # Redis may hold the rest
                self._away(err)
                break
            served += got
            self.stats.shared_reads += 1
            if not self.resident_reads:
                return
        self._count_page_cache(served, rb, local=False)
        if not served:
            self._resident_after = max(self._resident_after, time.monotonic() + RESIDENT_RETRY_S)

    def _resident_here(self, layer: int, prec: Precision, ids: np.ndarray, out: np.ndarray,
                       missing: np.ndarray) -> None:
        """``resident``, short-circuited: a syscall per run of records, so a read that finds
        nothing costs little and is not paused."""
        try:
            present = self.local.resident(layer, prec, ids, out)
        except (Unavailable, DeadlineExceeded, FailedPrecondition) as err:  # this layer's table: the store is away
            self._away(err)
            return
        if present is None:
            log.info("this file system cannot read its page cache alone: misses go to Redis")
            self.resident_reads = False
            return
        missing &= ~present
        self._count_page_cache(int(np.count_nonzero(present)), self.layout.num_bytes(prec), local=True)

    def _away(self, err: Exception) -> None:
        """The store failed a page-cache read (gone, restarting): Redis serves for a while."""
        log.warning("page-cache reads paused for %.0f s: %s", AWAY_RETRY_S, err)
        self._resident_after = time.monotonic() + AWAY_RETRY_S

    def _count_page_cache(self, served: int, record_bytes: int, local: bool) -> None:
        self.stats.page_cache_records += served
        self.stats.page_cache_bytes += served * record_bytes
        self.stats.bytes += served * record_bytes
        if local:
            self.stats.local_records += served

    def read(self, layer: int, prec: Precision, ids: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """``ids[rows]`` into ``out[rows]``: read here (short-circuit), else by the store into
        the region, a region's worth at a time, each placed and checked (unless the store
        checked it). Raises FailedPrecondition when the store no longer sees the region."""
        if self.local is not None:
            whole = rows.size == ids.size
            dest = out if whole else np.empty((rows.size, out.shape[1]), np.uint8)
            self.local.read(layer, prec, ids if whole else ids[rows], dest)
            if not whole:
                out[rows] = dest
            nbytes = int(dest.nbytes)
            self.stats.store_records += int(rows.size)
            self.stats.local_records += int(rows.size)
            self.stats.store_bytes += nbytes
            self.stats.bytes += nbytes
            return
        step = self._step(prec)

        def consume(chunk: np.ndarray, data: np.ndarray, resp) -> tuple[float, int]:
            if len(resp.crc32c) != chunk.size:
                raise ChecksumError(f"layer {layer} {prec.name}: the store read {len(resp.crc32c)} of "
                                    f"{chunk.size} records")
            lengths = np.asarray(resp.record_lengths, np.int64) if resp.record_lengths else None
            return place(out, chunk, data, lengths, np.asarray(resp.crc32c, np.uint32), self.layout, prec, ids,
                         self.verify and not resp.verified), int(resp.nbytes)

        for lo in range(0, rows.size, step):
            chunk = rows[lo : lo + step]
            decode_s, nbytes = self.reader.read(self._request(layer, prec, ids[chunk]),
                                                lambda data, resp: consume(chunk, data, resp))
            self.stats.shared_reads += 1
            self.stats.decode_seconds += decode_s
            self.stats.store_bytes += nbytes
            self.stats.bytes += nbytes
        self.stats.store_records += int(rows.size)

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        self.reader.close()
