"""Checked reads of ``neurons.bin`` records, given where they lie and their CRC-32Cs.

The store's reader (store/reader.py: spans and CRCs from LMDB) and a worker on the
store's host (worker/same_host.py: spans and CRCs from the store's socket, the file's
descriptor passed with them) read records the same way, so a record is found and
checked the same way whichever process reads it:
- ``read``: any batch, as stored, back to back; scattered batches of fixed-size records
  in C loops of preads, the rest as coalesced runs on the file's thread pool;
- ``read_fixed`` / ``resident_fixed``: records of one segment of fixed-size records (the
  dense codec), a cache's scattered misses in one C call (``read_ids`` / ``resident_ids``;
  after a batch that waited on the device, page cache first and the rest several at a
  time), anything else by ``read`` / ``resident``;
- ``resident``: only what the page cache holds, never waiting on the device.
A record that fails its CRC, or that the file ends before, is a ChecksumError naming it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from m2cache.codec import checksum
from m2cache.codec.format import RECORDS_FILE, Precision
from m2cache.errors import ChecksumError
from m2cache.store.segments import RecordFile, ShortRead, plan

SCATTERED_MIN_RECORDS_PER_RUN = 8  # a sorted batch with runs shorter than this on average is read in C loops
# read_ids: a batch slower than this waited on the device (a page-cache read here is about
# 1 us a record plus its copy; a device read 100 us or more)
DEVICE_S_PER_RECORD, DEVICE_S_PER_BYTE = 20e-6, 1e-9
COLD_STREAK = 64  # read_ids: batches read page-cache-first, the rest in parallel, after one that was not


@dataclass(frozen=True, slots=True)
class FixedSegment:
    """One (layer, precision) of fixed-size records: where it starts in the records file,
    its record size, its CRC-32C table [d_ffn] and that table's address (for C)."""

    base: int
    size: int
    crcs: np.ndarray  # uint32 [d_ffn], kept alive with its address
    crc_addr: int

    @classmethod
    def of(cls, base: int, size: int, crcs: np.ndarray) -> "FixedSegment":
        crcs = np.ascontiguousarray(crcs, dtype=np.uint32)
        return cls(base, size, crcs, crcs.ctypes.data)


class RecordReads:
    """Reads of one records file; ``expected_bytes`` is its size when whole (named when it is short)."""

    def __init__(self, records: RecordFile, verify: bool, expected_bytes: int):
        self.records = records
        self.verify = verify
        self.expected_bytes = expected_bytes
        self.cold_streak = 0  # read_ids: batches left to read page-cache-first (see there)

    def read(self, layer: int, prec: Precision, ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
             crcs: np.ndarray, dest: np.ndarray, fixed: bool) -> None:
        """Records of ``ids`` [m] at file offsets ``starts`` with ``lengths`` -> ``dest`` (flat
        uint8) back to back, checked against ``crcs`` when verifying. ``fixed``: every record
        is ``lengths[0]`` long (the dense codec)."""
        if not (fixed and self._read_scattered(layer, prec, ids, starts, lengths, crcs, dest)):
            self._read_tasks(layer, prec, ids, starts, lengths, crcs, dest)

    def read_fixed(self, layer: int, prec: Precision, ids: np.ndarray, seg: FixedSegment, dest: np.ndarray) -> None:
        """Records of ``ids`` [m] (any order) of a segment of fixed-size records -> ``dest``
        [m, size], checked: a cache's scattered misses in one C call, the rest by ``read``."""
        if not self.read_ids(layer, prec, ids, seg, dest):
            self.read(layer, prec, ids, seg.base + ids * seg.size, np.full(ids.size, seg.size, np.int64), seg.crcs[ids],
                      dest.reshape(-1), fixed=True)

    def resident_fixed(self, layer: int, prec: Precision, ids: np.ndarray, seg: FixedSegment, dest: np.ndarray
                       ) -> np.ndarray | None:
        """``read_fixed`` from the page cache alone: the mask [m] of the rows read (None:
        the page cache cannot be asked alone; see ``resident``)."""
        present = self.resident_ids(layer, prec, ids, seg, dest)
        if present is not None:
            return present
        return self.resident(layer, prec, ids, seg.base + ids * seg.size, seg.size, seg.crcs[ids], dest)

    def read_ids(self, layer: int, prec: Precision, ids, seg: FixedSegment, dest) -> bool:
        """A cache's scattered misses in one C call: ascending ``ids`` [m] (int64, numpy or
        CPU tensor) of a segment of fixed-size records -> ``dest`` [m, size], checked against
        the segment's CRC table when verifying. False (nothing read) where the C call does
        not apply (RecordFile.read_checked).

        One pread after another suits records in the page cache; off the device they wait
        on it one at a time. So after a batch that read slower than a page-cache copy
        (``DEVICE_S_PER_RECORD``), the next COLD_STREAK batches read what the page cache
        holds first and the rest several at a time (``_read_cold``); a fully resident
        batch counts the streak down (an RWF_NOWAIT read costs about 15% more here)."""
        if self.cold_streak > 0:
            present = self.resident_ids(layer, prec, ids, seg, dest)
            if present is not None:
                if present.all():
                    self.cold_streak -= 1
                else:
                    self.cold_streak = COLD_STREAK
                    self._read_cold(layer, prec, np.asarray(ids, dtype=np.int64), seg, np.asarray(dest),
                                    np.flatnonzero(~present))
                return True
        t0 = time.perf_counter()
        try:
            bad = self.records.read_checked(seg.base, ids, seg.crcs.size, seg.size, seg.crc_addr if self.verify else 0,
                                            dest, SCATTERED_MIN_RECORDS_PER_RUN)
        except ShortRead as err:
            ids = np.asarray(ids, dtype=np.int64)
            self._short_read(layer, prec, ids, seg.base + ids * seg.size, np.full(ids.size, seg.size, np.int64), err)
        if bad is None:
            return False
        if time.perf_counter() - t0 > int(ids.shape[0]) * (DEVICE_S_PER_RECORD + seg.size * DEVICE_S_PER_BYTE):
            self.cold_streak = COLD_STREAK
        self._checked(layer, prec, ids, seg, dest, bad, None)
        return True

    def _read_cold(self, layer: int, prec: Precision, ids: np.ndarray, seg: FixedSegment, dest: np.ndarray,
                   rows: np.ndarray) -> None:
        """Rows ``rows`` of ``dest`` [m, size] (the records of ``ids[rows]`` the page cache did
        not hold), read on the pool's threads through a staging buffer and checked."""
        cold = ids[rows]
        stage = np.empty((rows.size, seg.size), np.uint8)
        try:
            bad = self.records.read_checked_parallel(seg.base, cold, seg.crcs.size, seg.size,
                                                     seg.crc_addr if self.verify else 0, stage)
        except ShortRead as err:
            self._short_read(layer, prec, cold, seg.base + cold * seg.size, np.full(cold.size, seg.size, np.int64), err)
        self._checked(layer, prec, cold, seg, stage, bad, None)
        dest[rows] = stage

    def resident_ids(self, layer: int, prec: Precision, ids, seg: FixedSegment, dest) -> np.ndarray | None:
        """``read_ids`` from the page cache alone: the mask [m] of the rows read and checked,
        or None where the C call does not apply (RecordFile.resident_checked)."""
        got = self.records.resident_checked(seg.base, ids, seg.crcs.size, seg.size, seg.crc_addr if self.verify else 0,
                                            dest)
        if got is None:
            return None
        self._checked(layer, prec, ids, seg, dest, got[1], got[0])
        return got[0]

    def _checked(self, layer, prec, ids, seg: FixedSegment, dest, bad: int, present: np.ndarray | None) -> None:
        """The C call's CRC verdict ``bad`` (-1 all matched, -2 unchecked, else the first bad
        row) -> ChecksumError naming the record; unchecked rows (``present``, or all) are
        checked here with the library's CRC, one call per record, when verifying."""
        if bad >= 0:
            raise ChecksumError(f"record layer {layer} neuron {int(ids[bad])} {prec.name} fails its checksum")
        if bad == -2 and self.verify:  # no CRC32 instruction in the C build
            ids = np.asarray(ids, dtype=np.int64)
            rows = np.arange(ids.size) if present is None else np.flatnonzero(present)
            self.check_each(layer, prec, ids[rows], np.asarray(dest).reshape(ids.size, seg.size), rows * seg.size,
                            np.full(rows.size, seg.size, np.int64), seg.crcs[ids[rows]])

    def resident(self, layer: int, prec: Precision, ids: np.ndarray, starts: np.ndarray, size: int,
                 crcs: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """The fixed-size records of ``ids`` [m] the page cache holds -> their rows of ``out``
        [m, size], checked when verifying; the mask [m] of rows read, or None where the page
        cache cannot be asked alone (RecordFile.read_resident)."""
        present = self.records.read_resident(starts, size, out)
        if present is not None and self.verify and present.any():
            rows = np.flatnonzero(present)
            self.check_each(layer, prec, ids[rows], out, rows * size, np.full(rows.size, size, np.int64), crcs[rows])
        return present

    def _read_scattered(self, layer, prec, ids, starts, lengths, crcs, dest) -> bool:
        """A scattered batch of fixed-size records (a cache's misses: records spread over a
        layer) costs a Python call per run on the task path; read them in C loops instead
        (RecordFile.read_records), check each one's CRC in one call. False (nothing read)
        where that does not apply: O_DIRECT, unsorted ids, or batches that are mostly
        contiguous (runs of SCATTERED_MIN_RECORDS_PER_RUN records or more on average: the
        task path reads each run with one syscall straight into place)."""
        if self.records.direct_fd is not None or ids.size < 2 or not bool(np.all(ids[1:] > ids[:-1])):
            return False
        runs = 1 + int(np.count_nonzero(ids[1:] != ids[:-1] + 1))
        if runs * SCATTERED_MIN_RECORDS_PER_RUN < ids.size:
            return False  # mostly contiguous: a few long runs
        size = int(lengths[0])
        try:
            self.records.read_records(starts, size, dest.reshape(ids.size, size))
        except ShortRead as err:
            self._short_read(layer, prec, ids, starts, lengths, err)
        if self.verify:
            self.check_each(layer, prec, ids, dest, np.arange(ids.size, dtype=np.int64) * size, lengths, crcs)
        return True

    def _read_tasks(self, layer, prec, ids, starts, lengths, crcs, dest) -> None:
        tasks = plan(starts, lengths, crcs if self.verify else None, self.records.task_bytes)
        try:
            bad = self.records.read(dest, tasks)
        except ShortRead as err:
            self._short_read(layer, prec, ids, starts, lengths, err)
        if bad:  # a task failed its CRC: check its records one by one to name the first bad one
            task = bad[0]
            rows = np.arange(task.row_lo, task.row_hi)
            at = task.dest_lo + np.concatenate([[0], np.cumsum(lengths[rows][:-1])]).astype(np.int64)
            self.check_each(layer, prec, ids[rows], dest, at, lengths[rows], crcs[rows])
            raise ChecksumError(f"record layer {layer} neuron {int(ids[task.row_lo])} {prec.name} fails its checksum")

    def _short_read(self, layer, prec, ids, starts, lengths, err: ShortRead):
        row = int(np.searchsorted(starts + lengths, err.offset, side="right"))
        nid = int(ids[min(row, ids.size - 1)])
        raise ChecksumError(f"record layer {layer} neuron {nid} {prec.name} is missing or truncated "
                            f"({RECORDS_FILE} ends at byte {self.records.size} of {self.expected_bytes})") from None

    @staticmethod
    def check_each(layer, prec, ids, dest, starts, lengths, crcs) -> None:
        """Every record's CRC-32C (one C call); the first that fails is named."""
        wrong = np.flatnonzero(checksum.crc32c_spans(dest, starts, lengths) != crcs)
        if wrong.size:
            raise ChecksumError(f"record layer {layer} neuron {int(ids[wrong[0]])} {prec.name} fails its checksum")
