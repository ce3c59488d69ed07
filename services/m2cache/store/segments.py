"""The SSD read path: byte spans of ``neurons.bin`` -> a destination buffer.

A read is given, per record (row), its file offset and length and where it goes
in the destination. Rows that are contiguous in the file and in the destination
(consecutive neuron ids) are coalesced into runs; the runs are cut into tasks of
about ``task_bytes`` of destination, and a thread pool reads each task's runs
with ``os.preadv`` straight into the destination (the syscall releases the GIL,
so tasks overlap on the device) and then checksums the task's bytes with one
CRC-32C call (also outside the GIL) against the CRC predicted from the records'
own CRCs (codec/checksum.py). Every step before the syscalls is vectorised:
there is no per-record Python loop, only one call per run.

With ``direct`` the file is also opened with O_DIRECT: runs are widened to
4 KiB boundaries, read into a per-thread aligned bounce buffer and copied out,
so the page cache is bypassed (the DRAM tier already caches what matters).
io_uring would save the per-run syscalls; Python has no stable binding for it
in this project's dependencies, so preadv on a thread pool it is.

Scattered batches of fixed-size records (a cache's misses: runs of a record or
two) skip the per-run Python: ``read_records`` reads them in C loops of preads
(gather.c beside this file), split across the pool when large. The file is opened
with POSIX_FADV_RANDOM: every read asks for exactly the bytes it needs, and the
kernel's readahead only multiplied the device bytes of scattered reads.
``read_resident`` is the same C loop with RWF_NOWAIT: it copies only what the page
cache already holds (a same-host DRAM tier that costs no Redis round trip) and says
which records those were.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m2cache import native
from m2cache.codec import checksum

log = logging.getLogger(__name__)
ALIGN = 4096
RECORD_GAP_BYTES = 4096  # read_records: records this close share one pread (a syscall costs more than 4 KiB of copy)
RECORDS_PER_THREAD = 512  # read_records: batches this many times the pool's threads are split across them
COLD_RECORDS_PER_THREAD = 4  # read_checked_parallel: records off the device, this many a thread at least


class ShortRead(Exception):
    """The file ended before ``offset`` + the bytes asked for (a truncated store)."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Task:
    """Destination rows [row_lo, row_hi) = bytes [dest_lo, dest_hi); runs as (file offset, nbytes, dest offset)."""

    row_lo: int
    row_hi: int
    dest_lo: int
    dest_hi: int
    runs: tuple[tuple[int, int, int], ...]
    expected_crc: int | None


def plan(file_starts: np.ndarray, lengths: np.ndarray, crcs: np.ndarray | None, task_bytes: int) -> list[Task]:
    """Tasks for rows with these file offsets and lengths [m], laid back to back in
    the destination in row order; ``crcs`` [m] (or None) gives each task's expected CRC."""
    m = int(lengths.size)
    if m == 0:
        return []
    dest_starts = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)  # [m]
    dest_ends = dest_starts + lengths
    task_of = dest_starts // max(task_bytes, 1)  # [m] task index of each row
    new_task = np.concatenate([[True], task_of[1:] != task_of[:-1]])
    contiguous = np.concatenate([[False], file_starts[1:] == file_starts[:-1] + lengths[:-1]])
    run_first = np.flatnonzero(new_task | ~contiguous)  # [r] first row of each run
    run_last = np.concatenate([run_first[1:], [m]]) - 1
    run_file = file_starts[run_first]
    run_dest = dest_starts[run_first]
    run_len = dest_ends[run_last] - run_dest
    task_first_run = np.flatnonzero(new_task[run_first])  # runs that open a task
    bounds = np.concatenate([task_first_run, [run_first.size]])
    rows = np.concatenate([run_first[task_first_run], [m]])  # [t + 1] first row of each task, then m
    expected = None if crcs is None else _task_crcs(crcs, lengths, rows)
    runs = list(zip(run_file.tolist(), run_len.tolist(), run_dest.tolist()))  # one tuple per run, not per record
    lo, hi = rows[:-1], rows[1:]
    want = [None] * lo.size if expected is None else expected.tolist()
    return [Task(*fields, tuple(runs[a:b]), w) for fields, a, b, w in
            zip(zip(lo.tolist(), hi.tolist(), dest_starts[lo].tolist(), dest_ends[hi - 1].tolist()),
                bounds[:-1].tolist(), bounds[1:].tolist(), want)]


def _task_crcs(crcs: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Expected CRC-32C of each task's bytes: its records' CRCs laid in a padded
    [tasks, widest] matrix (pads are neutral zero-length records), reduced row-wise."""
    counts = np.diff(rows)
    width = int(counts.max())
    task_of_row = np.repeat(np.arange(counts.size), counts)
    col = np.arange(rows[-1]) - rows[:-1][task_of_row]
    grid_c = np.zeros((counts.size, width), np.uint32)
    grid_n = np.zeros((counts.size, width), np.int64)
    grid_c[task_of_row, col] = crcs
    grid_n[task_of_row, col] = lengths
    return checksum.concat_rows(grid_c, grid_n)


class RecordFile:
    """``neurons.bin`` opened for parallel positional reads. Thread-safe. ``fd``: a
    descriptor of it to adopt instead of opening ``path`` (one the store passed; it is
    closed with this object, and ``path`` only names it in errors)."""

    def __init__(self, path: str | os.PathLike, io_threads: int = 4, direct: bool = False,
                 task_bytes: int = 4 << 20, fd: int | None = None):
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) if fd is None else fd
        self.size = os.fstat(self.fd).st_size
        if hasattr(os, "posix_fadvise"):  # reads are exact spans: readahead only inflates scattered misses
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.direct_fd = None
        if direct:
            try:
                self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError as err:  # e.g. tmpfs: no O_DIRECT
                log.warning("O_DIRECT unavailable for %s (%s): reading through the page cache", self.path, err)
        self.task_bytes = task_bytes
        self.nowait = hasattr(os, "RWF_NOWAIT")  # read_resident can ask the page cache alone
        self.io_threads = max(1, io_threads)
        self.pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="store-io")
        self._local = threading.local()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)
        if self.direct_fd is not None:
            os.close(self.direct_fd)

    def read(self, dest: np.ndarray, tasks: list[Task]) -> list[Task]:
        """Run ``tasks`` into ``dest`` (flat uint8); returns the tasks whose bytes fail
        their expected CRC. Raises :class:`ShortRead` if the file ends early."""
        if not tasks:
            return []
        view = memoryview(dest.reshape(-1))
        if len(tasks) == 1:  # small reads: no pool hop
            return [tasks[0]] if not self._run(view, dest, tasks[0]) else []
        futures = [self.pool.submit(self._run, view, dest, task) for task in tasks]
        results = [f.result() for f in futures]  # re-raises ShortRead
        return [task for task, ok in zip(tasks, results) if not ok]

    def read_records(self, starts: np.ndarray, size: int, dest: np.ndarray) -> None:
        """Fixed-size records at file offsets ``starts`` [m] -> ``dest`` [m, size] in one C
        call (gather.c; a Python loop where it cannot be built): one pread per record, or
        per run of records at most RECORD_GAP_BYTES apart; a large batch is split across
        the pool's threads (the device sees several reads at once). A scattered batch (a
        cache's misses) costs about its own bytes, not a read of the range that covers
        it. Raises :class:`ShortRead` past the end of the file."""
        offsets = np.ascontiguousarray(starts, dtype=np.int64)
        lib = _gather_library()
        if lib is None:
            view = memoryview(dest.reshape(-1))
            for i, offset in enumerate(offsets.tolist()):
                self._read_exact(self.fd, view[i * size : (i + 1) * size], offset)
            return
        self._split(offsets, size, dest.reshape(-1), lambda o, d, _p: self._read_records_c(lib, o, size, d), None)

    def read_checked(self, base: int, ids, num_ids: int, size: int, crc_addr: int, dest, min_per_run: int
                     ) -> int | None:
        """A scattered batch of one segment's fixed-size records in one C call (gather.c):
        ascending ``ids`` [m] (int64, numpy or CPU tensor) at ``base + id * size`` -> ``dest``
        [m, size] (uint8, numpy or CPU tensor), each checked against the segment's CRC-32C
        table at address ``crc_addr`` (uint32 [num_ids]; 0: unchecked). Returns -1 (read and
        checked), -2 (read, not checked: no CRC32 instruction in this build), or the row of
        the first record that differs from its CRC; None where nothing was read (no C
        library, O_DIRECT, a batch for the pool's threads, buffers not contiguous, ids not
        ascending or outside [0, num_ids), or runs of ``min_per_run`` records or more on
        average). Raises :class:`ShortRead` past the end of the file."""
        args = self._checked_args(ids, dest, size)
        if args is None:
            return None
        lib, ids_at, n, dest_at = args
        out = (ctypes.c_int64 * 3)()
        lib.m2r_read_checked(self.fd, base, ids_at, n, num_ids, size, RECORD_GAP_BYTES, min_per_run, crc_addr or None,
                             dest_at, out)
        if out[0] == -2:
            return None
        if out[0] >= 0:
            if out[1]:
                raise OSError(int(out[1]), os.strerror(int(out[1])), self.path)
            raise ShortRead(base + int(ids[out[0]]) * size)
        return int(out[2])

    def read_checked_parallel(self, base: int, ids: np.ndarray, num_ids: int, size: int, crc_addr: int,
                              dest: np.ndarray) -> int:
        """``read_checked`` of records the page cache does not hold, split across the pool's
        threads so the device sees several reads at once (600 cold 24 KiB records of a layer
        came off this VM's disk 2-3x faster four or eight at a time than one after another).
        ``ids`` ascending int64 [m], ``dest`` uint8 [m, size], both contiguous numpy. Returns
        as read_checked (the first bad row of the whole batch); raises ShortRead, OSError."""
        n = ids.size
        parts = max(min(self.io_threads, -(-n // COLD_RECORDS_PER_THREAD)), -(-n // (2 * RECORDS_PER_THREAD - 1)))

        def part(a: int, b: int) -> int:
            got = self.read_checked(base, ids[a:b], num_ids, size, crc_addr, dest[a:b], n + 1)  # every batch taken
            if got is None:  # parts are contiguous and under the pool's size: only a bad caller gets here
                raise ValueError(f"records [{a}, {b}) of a batch could not be read in one C call")
            return got

        results = self._in_parts(n, parts, part)
        return next((a + got for a, got in results if got >= 0), results[0][1])

    def resident_checked(self, base: int, ids, num_ids: int, size: int, crc_addr: int, dest
                         ) -> tuple[np.ndarray, int] | None:
        """``read_checked`` from the page cache alone (RWF_NOWAIT, gather.c): the records of
        ``ids`` it holds -> their rows of ``dest``, each checked. Returns (present mask [m],
        -1 / -2 / the first row that differs from its CRC, as ``read_checked``), or None
        where nothing was asked (no C library or RWF_NOWAIT, O_DIRECT, a batch for the pool,
        buffers not contiguous, ids not ascending or outside [0, num_ids))."""
        args = self._checked_args(ids, dest, size) if self.nowait else None
        if args is None:
            return None
        lib, ids_at, n, dest_at = args
        present = np.empty(n, dtype=np.uint8)
        out = (ctypes.c_int64 * 3)()
        lib.m2r_resident_checked(self.fd, base, ids_at, n, num_ids, size, RECORD_GAP_BYTES, crc_addr or None, dest_at,
                                 present.ctypes.data, out)
        if out[0] == -2:
            return None
        if out[1] in (errno.EOPNOTSUPP, errno.EINVAL):
            self.nowait = False
            return None
        if out[1]:
            raise OSError(int(out[1]), os.strerror(int(out[1])), self.path)
        return present.view(bool), int(out[2])

    def _checked_args(self, ids, dest, size: int) -> tuple[ctypes.CDLL, int, int, int] | None:
        """(library, ids' address, m, dest's address) for a checked read of ``ids`` [m] into
        ``dest`` [m, size] in one C call; None where it does not apply (see read_checked)."""
        lib = _gather_library()
        ids_at, dest_at = address(ids, np.int64), address(dest, np.uint8)
        if lib is None or self.direct_fd is not None or ids_at is None or dest_at is None or ids.ndim != 1:
            return None
        n = ids.shape[0]
        if n >= 2 * RECORDS_PER_THREAD or tuple(dest.shape) != (n, size):
            return None
        return lib, ids_at, n, dest_at

    def read_resident(self, starts: np.ndarray, size: int, dest: np.ndarray) -> np.ndarray | None:
        """The records of ``starts`` [m] that the page cache holds -> their rows of ``dest``
        [m, size], without waiting on the device (preadv2 RWF_NOWAIT, gather.c); returns
        the mask [m] of rows read. None where that cannot be asked (no C library, or a
        kernel or file system without RWF_NOWAIT): the caller reads another way."""
        lib = _gather_library()
        if lib is None or not self.nowait or self.direct_fd is not None:  # O_DIRECT: no page cache by choice
            return None
        offsets = np.ascontiguousarray(starts, dtype=np.int64)
        present = np.zeros(offsets.size, dtype=np.uint8)

        def part(o: np.ndarray, d: np.ndarray, p: np.ndarray) -> None:
            out = np.empty(2, dtype=np.int64)
            lib.m2r_pread_resident(self.fd, o.ctypes.data, o.size, size, RECORD_GAP_BYTES, d.ctypes.data,
                                   p.ctypes.data, out.ctypes.data)
            if out[1] in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait = False
            elif out[1]:
                raise OSError(int(out[1]), os.strerror(int(out[1])), self.path)

        self._split(offsets, size, dest.reshape(-1), part, present)
        return present.view(bool) if self.nowait else None

    def _split(self, offsets: np.ndarray, size: int, flat: np.ndarray, call, present: np.ndarray | None) -> None:
        """``call(offsets part, dest part, present part)`` once, or once per pool thread
        for a batch of more than RECORDS_PER_THREAD records a thread."""
        self._in_parts(offsets.size, min(self.io_threads, offsets.size // RECORDS_PER_THREAD),
                       lambda a, b: call(offsets[a:b], flat[a * size : b * size],
                                         None if present is None else present[a:b]))

    def _in_parts(self, n: int, parts: int, call) -> list[tuple[int, object]]:
        """``call(a, b)`` over ``max(parts, 1)`` even slices [a, b) of [0, n): inline for one,
        else on the pool's threads; returns [(a, its result)] in order (re-raises
        ShortRead / OSError)."""
        bounds = np.linspace(0, n, max(parts, 1) + 1).astype(np.int64).tolist()
        slices = list(zip(bounds[:-1], bounds[1:]))
        if len(slices) == 1:
            return [(0, call(0, n))]
        futures = [(a, self.pool.submit(call, a, b)) for a, b in slices]
        return [(a, f.result()) for a, f in futures]

    def _read_records_c(self, lib, offsets: np.ndarray, size: int, dest: np.ndarray) -> None:
        out = np.empty(2, dtype=np.int64)
        lib.m2r_pread_records(self.fd, offsets.ctypes.data, offsets.size, size, RECORD_GAP_BYTES, dest.ctypes.data,
                              out.ctypes.data)
        if out[0] >= 0:
            if out[1]:
                raise OSError(int(out[1]), os.strerror(int(out[1])), self.path)
            raise ShortRead(int(offsets[out[0]]))

    def _run(self, view: memoryview, dest: np.ndarray, task: Task) -> bool:
        for offset, nbytes, at in task.runs:
            if self.direct_fd is not None:
                self._read_direct(view, offset, nbytes, at)
            else:
                self._read_exact(self.fd, view[at : at + nbytes], offset)
        if task.expected_crc is None:
            return True
        return checksum.crc32c(dest.reshape(-1)[task.dest_lo : task.dest_hi]) == task.expected_crc

    @staticmethod
    def _read_exact(fd: int, target: memoryview, offset: int) -> None:
        done = 0
        while done < len(target):
            got = os.preadv(fd, [target[done:]], offset + done)
            if got <= 0:
                raise ShortRead(offset + done)
            done += got

    def _read_direct(self, view: memoryview, offset: int, nbytes: int, at: int) -> None:
        lo = offset - offset % ALIGN
        hi = -(-(offset + nbytes) // ALIGN) * ALIGN
        bounce = self._bounce(hi - lo)
        got = os.preadv(self.direct_fd, [memoryview(bounce)[: hi - lo]], lo)
        if got < offset + nbytes - lo:
            raise ShortRead(lo + max(got, 0))
        view[at : at + nbytes] = memoryview(bounce)[offset - lo : offset - lo + nbytes]

    def _bounce(self, nbytes: int) -> mmap.mmap:
        """A page-aligned buffer per thread (anonymous mmap), grown as needed."""
        buf = getattr(self._local, "bounce", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.bounce = mmap.mmap(-1, max(nbytes, self.task_bytes + 2 * ALIGN))
        return buf


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.uint8): torch.uint8}


def address(a, dtype) -> int | None:
    """The data address of a C-contiguous CPU numpy array or tensor of ``dtype``, else None."""
    if isinstance(a, torch.Tensor):
        ok = a.dtype == _TORCH_DTYPES[np.dtype(dtype)] and a.device.type == "cpu" and a.is_contiguous()
        return a.data_ptr() if ok else None
    if isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous:
        return a.ctypes.data
    return None


@functools.cache
def _gather_library():
    """gather.c, or None (no compiler, M2CACHE_KERNELS=torch)."""
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    return native.load(Path(__file__).with_name("gather.c"), "m2r_abi_version", 5,
                       {"m2r_pread_records": [I32, P, I64, I64, I64, P, P],
                        "m2r_pread_resident": [I32, P, I64, I64, I64, P, P, P],
                        "m2r_read_checked": [I32, I64, P, I64, I64, I64, I64, I64, P, P, P],
                        "m2r_resident_checked": [I32, I64, P, I64, I64, I64, I64, P, P, P, P]})
