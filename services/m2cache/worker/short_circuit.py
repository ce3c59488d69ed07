"""Short-circuit reads: on the store's host, the worker reads the store's records file itself.

The store passes the descriptor of a dense model's ``neurons.bin`` over its Unix socket
(RecordFileRequest, SCM_RIGHTS: HDFS's short-circuit local reads), with where each
layer's records of each precision lie and their CRC-32Cs, asked once per (layer,
precision) as the store's own reader caches them. A fetch then costs what it costs
in-process, because it is the same code (store/record_reads.py): what the page cache
holds is copied straight into the fetch buffer (preadv2 RWF_NOWAIT, never waiting on
the device), the rest read by this process's preads, every record checked against its
CRC. No round trip per read, no region, no second copy. The descriptor is read-only
and needs neither the store's path nor its mounts; it stays valid while the store
restarts. Where the store will not share it (bitmap codec, O_DIRECT, turned off) or
has no socket, ``open`` returns None and the store reads into the region per request.
"""
from __future__ import annotations

import logging

import numpy as np

from m2cache.codec.format import Precision, RecordLayout
from m2cache.errors import FailedPrecondition, M2CacheError
from m2cache.store.reader import DEFAULT_IO_THREADS
from m2cache.store.record_reads import FixedSegment, RecordReads
from m2cache.store.segments import RecordFile
from m2cache.store.shared_reader import SharedReader

log = logging.getLogger(__name__)


class LocalRecords:
    """One model's records file, read in this process. Thread-safe."""

    def __init__(self, reader: SharedReader, model: str, layout: RecordLayout, d_ffn: int, records: RecordFile,
                 expected_bytes: int, verify: bool):
        self.reader = reader
        self.model = model
        self.layout = layout
        self.d_ffn = d_ffn
        self.reads = RecordReads(records, verify, expected_bytes)
        self._tables: dict[tuple[int, Precision], FixedSegment] = {}

    @classmethod
    def open(cls, reader: SharedReader, model: str, layout: RecordLayout, d_ffn: int, verify: bool
             ) -> "LocalRecords | None":
        try:
            resp, fd = reader.record_file(model, 0, int(Precision.FULL), want_fd=True)
        except M2CacheError as err:
            log.info("no short-circuit reads (%s): the store reads each batch into the region", err)
            return None
        records = RecordFile(f"model {model}'s records file (the store's descriptor)", DEFAULT_IO_THREADS, fd=fd)
        local = cls(reader, model, layout, d_ffn, records, int(resp.file_bytes), verify)
        try:
            local._tables[(0, Precision.FULL)] = local._parse(0, Precision.FULL, resp)
        except FailedPrecondition as err:
            log.warning("no short-circuit reads: %s", err)
            local.close()
            return None
        if records.size < resp.file_bytes:
            log.error("%s is truncated: %d of %d bytes; reads past its end fail naming the records",
                      records.path, records.size, resp.file_bytes)
        log.info("short-circuit reads of model %s's records (%d MiB)", model, records.size >> 20)
        return local

    def _parse(self, layer: int, prec: Precision, resp) -> FixedSegment:
        crcs = np.frombuffer(resp.crc32c, dtype="<u4")
        rb = self.layout.num_bytes(prec)
        if resp.record_bytes != rb or crcs.size != self.d_ffn:
            raise FailedPrecondition(f"model {self.model} layer {layer} {prec.name}: the store describes "
                                     f"{crcs.size} records of {resp.record_bytes} B, the manifest {self.d_ffn} "
                                     f"of {rb} B (the model changed under this worker)")
        return FixedSegment.of(int(resp.segment_offset), rb, crcs)

    def _table(self, layer: int, prec: Precision) -> FixedSegment:
        found = self._tables.get((layer, prec))
        if found is None:
            resp, _ = self.reader.record_file(self.model, layer, int(prec), want_fd=False)
            found = self._tables[(layer, prec)] = self._parse(layer, prec, resp)
        return found

    def resident(self, layer: int, prec: Precision, ids: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """The records of ``ids`` [m] the page cache holds -> their rows of ``out`` [m, rb],
        checked; the mask [m] of rows read (None: this file system cannot say)."""
        return self.reads.resident_fixed(layer, prec, ids, self._table(layer, prec), out)

    def read(self, layer: int, prec: Precision, ids: np.ndarray, out: np.ndarray) -> None:
        """The records of ``ids`` [m] -> ``out`` [m, rb] (contiguous), checked: the page
        cache's or the device's, as the kernel has them."""
        self.reads.read_fixed(layer, prec, ids, self._table(layer, prec), out)

    def close(self) -> None:
        self.reads.records.close()
