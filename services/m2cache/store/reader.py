"""Read side of a neuron store (the SSD tier). No grpc here: the NeuronStore
service and the in-process path both use this class.

LMDB (``data.mdb``) holds the manifest, the per-record CRC-32C tables, the
segment table, dense tensors and files; the records live in ``neurons.bin``
and are read and checked by store/record_reads.py (coalesced runs or C loops of
preads on store/segments.py's thread pool; a worker on this host reads them the
same way). Records are handed out dense (``read_into``,
``get_neurons``) or as stored (``read_stored``, ``get_records``: bitmap-compressed
where the store's codec is "bitmap", with their lengths)."""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import torch

from m2cache.codec import bitmap
from m2cache.codec.format import (
    DTYPES,
    MANIFEST_KEY,
    RECORDS_FILE,
    Manifest,
    Precision,
    crc32,
    crc_key,
    dense_key,
    file_key,
    offsets_key,
    segment_key,
    unpack_segment,
)
from m2cache.errors import ChecksumError, InvalidArgument, NotFound, StoreNotFound
from m2cache.store.record_reads import FixedSegment, RecordReads
from m2cache.store.segments import RecordFile

log = logging.getLogger(__name__)
DEFAULT_IO_THREADS = 4  # parallel preadv calls per store: enough queue depth for an SSD, cheap on 2 cores
DEFAULT_TASK_BYTES = 4 << 20  # destination bytes per read task (one CRC-32C check each)


# py-lmdb refuses a second handle on an environment a process already has open,
# so every part of one process (store service, ranker, in-process runs) shares
# one handle per store: NeuronStore(path) returns the open instance, counted,
# and close() releases it, closing the environment with its last user.
_OPEN: dict[Path, "NeuronStore"] = {}
_OPEN_LOCK = threading.Lock()


def _open_env(path: Path) -> lmdb.Environment:
    """Read-only environment. Readahead stays on: records are multi-page and
    contiguous, and with it off every 4 KiB page is a separate synchronous fault
    (measured on a dropped page cache: a whole layer 50 -> 741 MB/s, a random
    quarter of it 48 -> 169 MB/s). Locking stays on where the directory is
    writable, since the ranker may write predictors into a store being served; on
    a read-only mount (no lock file can be made) it opens without locking, which
    is safe only while nothing writes."""
    try:
        return lmdb.open(str(path), readonly=True, max_readers=512, subdir=True)
    except lmdb.Error as err:
        if not any(text in str(err) for text in ("Read-only file system", "Permission denied")):
            raise
        log.warning("%s is read-only (%s): opening without LMDB locking", path, err)
        return lmdb.open(str(path), readonly=True, lock=False, max_readers=512, subdir=True)


@dataclass(frozen=True, slots=True)
class StoredRecords:
    """Records as stored, back to back in request order: ``payload`` uint8 [sum lengths],
    ``lengths`` [m] (None for the dense codec: every record ``record_bytes`` long), ``crcs`` [m]."""

    payload: np.ndarray
    lengths: np.ndarray | None
    crcs: np.ndarray
    record_bytes: int


class NeuronStore:
    """One converted model. ``read_into`` puts the dense records of many neurons of
    one layer at one precision into a caller's buffer, checksum-verified."""

    def __new__(cls, path: str | os.PathLike, verify: bool = True, io_threads: int = DEFAULT_IO_THREADS,
                direct_io: bool = False):
        key = Path(path).resolve()
        with _OPEN_LOCK:
            store = _OPEN.get(key)
            if store is None:
                store = super().__new__(cls)
                store._refs = 0
                store._open(key, verify, io_threads, direct_io)
                _OPEN[key] = store
            store._refs += 1
            return store

    def _open(self, path: Path, verify: bool, io_threads: int, direct_io: bool) -> None:
        self.path = path
        if not (self.path / "data.mdb").is_file():
            raise StoreNotFound(f"no m2cache store at {self.path} (missing data.mdb)")
        self.env = _open_env(self.path)
        self.verify = verify
        with self.read_txn() as txn:
            raw = txn.get(MANIFEST_KEY)
        if raw is None:
            self.env.close()
            raise StoreNotFound(f"{self.path} has no manifest: not a finished m2cache store")
        try:
            self.manifest = Manifest.from_json(raw, where=str(self.path))
        except Exception:
            self.env.close()
            raise
        self.layout = self.manifest.layout
        records = self.path / RECORDS_FILE
        if not records.is_file():
            self.env.close()
            raise StoreNotFound(f"{self.path} has no {RECORDS_FILE}: not a finished m2cache store")
        self.records = RecordFile(records, io_threads, direct_io, DEFAULT_TASK_BYTES)
        self.reads = RecordReads(self.records, verify, self.manifest.records_file_bytes)
        if self.records.size < self.manifest.records_file_bytes:
            log.error("%s is truncated: %d of %d bytes; reads past its end fail naming the records", records,
                      self.records.size, self.manifest.records_file_bytes)
        self._tables: dict[tuple[bytes, int, Precision], np.ndarray | tuple[int, int]] = {}
        self._tables_lock = threading.Lock()
        self._fixed: dict[tuple[int, Precision], FixedSegment] = {}

    def close(self) -> None:
        """Release this user's share; the store closes with the last one."""
        with _OPEN_LOCK:
            self._refs -= 1
            if self._refs > 0:
                return
            _OPEN.pop(self.path, None)
        self.records.close()
        self.env.close()

    def drop_mapped_pages(self) -> None:
        """Reopen the LMDB environment so the pages earlier reads touched (the dense tensors,
        hundreds of MB for a 7B model) leave this process's resident set; they stay in the
        page cache. Call only while no read transaction is open (after loading a model)."""
        self.env.close()  # LMDB allows one environment per file per process
        self.env = _open_env(self.path)

    @contextmanager
    def read_txn(self, buffers: bool = False):
        """A read transaction; adopts the file's new size when another process
        (the ranker saving predictors) grew it since this handle opened."""
        try:
            txn = self.env.begin(buffers=buffers)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            txn = self.env.begin(buffers=buffers)
        with txn:
            yield txn

    # ---- validation -------------------------------------------------------
    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.manifest.num_layers:
            raise InvalidArgument(f"layer {layer} out of range: the model has {self.manifest.num_layers} layers")

    def check_neurons(self, neuron_ids) -> np.ndarray:
        ids = np.asarray(neuron_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.manifest.d_ffn):
            bad = ids[(ids < 0) | (ids >= self.manifest.d_ffn)][0]
            raise InvalidArgument(f"neuron id {bad} out of range: layers have {self.manifest.d_ffn} neurons")
        return ids

    # ---- per (layer, precision) tables ------------------------------------------
    def _table(self, kind: bytes, layer: int, prec: Precision):
        key = (kind, layer, prec)
        found = self._tables.get(key)
        if found is not None:
            return found
        lmdb_key = {b"c": crc_key, b"s": segment_key, b"o": offsets_key}[kind](layer, prec)
        with self.read_txn() as txn:
            raw = txn.get(lmdb_key)
        if raw is None:
            what = {b"c": "checksum table", b"s": "record segment", b"o": "record offsets"}[kind]
            raise NotFound(f"no {what} for layer {layer} {prec.name} in {self.path}")
        value = unpack_segment(raw) if kind == b"s" else np.frombuffer(raw, dtype="<u4" if kind == b"c" else "<u8")
        with self._tables_lock:
            self._tables[key] = value
        return value

    def segment(self, layer: int, prec: Precision) -> tuple[int, int]:
        """(offset, bytes) of (layer, prec)'s records in neurons.bin."""
        return self._table(b"s", layer, Precision.parse(prec))

    def crc_table(self, layer: int, prec: Precision) -> np.ndarray:
        """CRC-32C of every stored record of (layer, prec) [d_ffn], uint32."""
        return self._table(b"c", layer, Precision.parse(prec))

    def _fixed_segment(self, layer: int, prec: Precision) -> FixedSegment | None:
        """(layer, prec)'s records as one FixedSegment (dense codec; None otherwise), cached."""
        key = (layer, prec)
        found = self._fixed.get(key)
        if found is None and self.manifest.codec == "dense":
            self.check_layer(layer)
            found = FixedSegment.of(self.segment(layer, prec)[0], self.layout.num_bytes(prec), self.crc_table(layer, prec))
            self._fixed[key] = found  # (a race only builds the same value twice)
        return found

    def stored_lengths(self, layer: int, prec: Precision, ids: np.ndarray) -> np.ndarray | None:
        """Stored length of each record of ``ids`` (None for the dense codec)."""
        if self.manifest.codec == "dense":
            return None
        offsets = self._table(b"o", layer, prec)
        return (offsets[ids + 1] - offsets[ids]).astype(np.int64)

    def record_spans(self, layer: int, prec: Precision, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offset in neurons.bin and stored length of each record of ``ids`` [m] -> ([m], [m])."""
        seg_offset, _nbytes = self.segment(layer, prec)
        size = self.layout.num_bytes(prec)
        if self.manifest.codec == "dense":
            return seg_offset + ids * size, np.full(ids.size, size, dtype=np.int64)
        offsets = self._table(b"o", layer, prec)
        starts = offsets[ids].astype(np.int64)
        return seg_offset + starts, offsets[ids + 1].astype(np.int64) - starts

    # ---- neurons ----------------------------------------------------------
    def read_stored(self, layer: int, prec: Precision | int | str, neuron_ids, out: np.ndarray | None = None
                    ) -> StoredRecords:
        """Records of ``neuron_ids`` as stored, back to back in request order,
        CRC-verified when the store verifies. ``out``: a flat uint8 buffer of at
        least the batch's stored bytes to read into (else one is allocated)."""
        prec = Precision.parse(prec)
        self.check_layer(layer)
        ids = self.check_neurons(neuron_ids)
        fixed = self._fixed_segment(layer, prec)
        if fixed is not None:  # dense: every record fixed-size (a cache's misses: one C call)
            payload = np.empty(ids.size * fixed.size, np.uint8) if out is None else out.reshape(-1)[: ids.size * fixed.size]
            self.reads.read_fixed(layer, prec, ids, fixed, payload.reshape(ids.size, fixed.size))
            return StoredRecords(payload, None, fixed.crcs[ids], fixed.size)
        starts, lengths = self.record_spans(layer, prec, ids)
        crcs = self.crc_table(layer, prec)[ids]
        total = int(lengths.sum())
        payload = np.empty(total, dtype=np.uint8) if out is None else out.reshape(-1)[:total]
        self.reads.read(layer, prec, ids, starts, lengths, crcs, payload, fixed=False)
        return StoredRecords(payload, lengths, crcs, self.layout.num_bytes(prec))

    def read_into(self, layer: int, prec: Precision | int | str, neuron_ids, out) -> np.ndarray | torch.Tensor:
        """Dense records of ``neuron_ids`` (sorted or not, duplicates allowed) into ``out``
        uint8 [m, record_bytes] (numpy or CPU tensor, e.g. pinned), in ids order; returns ``out``.
        Sorted unique ids on a dense-codec store are read straight into ``out`` (no allocation)."""
        prec = Precision.parse(prec)
        fixed = self._fixed_segment(layer, prec)
        if fixed is not None and self.reads.read_ids(layer, prec, neuron_ids, fixed, out):
            return out  # a cache's misses (sorted, scattered): one C call, nothing converted
        ids = self.check_neurons(neuron_ids)
        size = self.layout.num_bytes(prec)
        dest = _check_out("read_into", out.numpy() if isinstance(out, torch.Tensor) else out, ids.size, size)
        if self.manifest.codec == "dense" and (ids.size < 2 or bool(np.all(ids[1:] > ids[:-1]))):
            self.read_stored(layer, prec, ids, out=dest)
            return out
        uniq, inverse = np.unique(ids, return_inverse=True)
        got = self.read_stored(layer, prec, uniq)
        if got.lengths is None:
            records = got.payload.reshape(uniq.size, size)
        else:
            spec = bitmap.element_spec(self.layout, prec)
            records = bitmap.decode(torch.from_numpy(got.payload), torch.from_numpy(got.lengths), spec).numpy()
        np.take(records, inverse.reshape(-1), axis=0, out=dest)
        return out

    def read_resident(self, layer: int, prec: Precision | int | str, neuron_ids, out: np.ndarray) -> np.ndarray | None:
        """The records of ``neuron_ids`` [m] that the page cache holds, into their rows of
        ``out`` (uint8 [m, record_bytes]; ids in any order), CRC-checked when the store verifies;
        returns the mask [m] of rows read, never waiting on the device. None where the
        page cache cannot be asked alone (bitmap codec, O_DIRECT, no RWF_NOWAIT)."""
        prec = Precision.parse(prec)
        self.check_layer(layer)
        ids = self.check_neurons(neuron_ids)
        fixed = self._fixed_segment(layer, prec)
        if fixed is None:
            return None
        _check_out("read_resident", out, ids.size, fixed.size)
        return self.reads.resident_fixed(layer, prec, ids, fixed, out)

    def get_records(self, layer: int, neuron_ids, prec: Precision | int | str) -> tuple[bytes, np.ndarray]:
        """Concatenated records as stored, in ``neuron_ids`` order, and their lengths [n]."""
        got = self.read_stored(layer, prec, neuron_ids)
        lengths = got.lengths if got.lengths is not None else np.full(got.crcs.size, got.record_bytes, np.int64)
        return got.payload.tobytes(), lengths

    def get_neurons(self, layer: int, neuron_ids, prec: Precision | int | str) -> bytes:
        """Concatenated dense records, in ``neuron_ids`` order (bitmap records decoded)."""
        prec = Precision.parse(prec)
        ids = self.check_neurons(neuron_ids)
        out = np.empty((ids.size, self.layout.num_bytes(prec)), dtype=np.uint8)
        return self.read_into(layer, prec, ids, out).tobytes()

    def get_layer(self, layer: int, prec: Precision | int | str) -> bytes:
        """All neurons of a layer at one precision, in id order."""
        return self.get_neurons(layer, range(self.manifest.d_ffn), prec)

    def neuron_weights(self, layer: int, neuron_ids, prec) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoded float32 weights [n, nvec, d] (+ [n] bias for ReLU models)."""
        prec = Precision.parse(prec)
        ids = self.check_neurons(neuron_ids)
        out = torch.empty((ids.size, self.layout.num_bytes(prec)), dtype=torch.uint8)
        return self.layout.decode(self.read_into(layer, prec, ids, out), prec)

    # ---- dense tensors and files -------------------------------------------
    def dense_names(self) -> list[str]:
        return list(self.manifest.dense)

    def get_dense_bytes(self, name: str) -> bytes:
        with self.read_txn(buffers=True) as txn:
            return bytes(self._dense_view(txn, name))

    def _dense_view(self, txn, name: str):
        """The mapped bytes of a dense tensor (valid inside ``txn``), checked against its crc32."""
        meta = self.manifest.dense.get(name)
        if meta is None:
            raise NotFound(f"no dense tensor {name!r} in {self.path}")
        view = txn.get(dense_key(name))
        if view is None or (self.verify and crc32(view) != meta["crc32"]):
            raise ChecksumError(f"dense record {name!r} is missing or fails its checksum")
        return view

    def dense_nbytes(self, name: str) -> int:
        meta = self.manifest.dense.get(name)
        if meta is None:
            raise NotFound(f"no dense tensor {name!r} in {self.path}")
        return int(np.prod(meta["shape"], dtype=np.int64)) * DTYPES[meta["dtype"]].itemsize

    def iter_dense(self, name: str, chunk_bytes: int):
        """(offset, bytes) chunks of a dense tensor of any size, verified once as a whole
        first; a read transaction stays open while the chunks are consumed."""
        with self.read_txn(buffers=True) as txn:
            view = self._dense_view(txn, name)
            if len(view) == 0:
                yield 0, b""
            for offset in range(0, len(view), chunk_bytes):
                yield offset, bytes(view[offset : offset + chunk_bytes])

    def get_dense(self, name: str) -> torch.Tensor:
        """A dense tensor, copied once out of the map (checked against its crc32)."""
        with self.read_txn(buffers=True) as txn:
            data = bytearray(self._dense_view(txn, name))
        meta = self.manifest.dense[name]
        dtype = DTYPES[meta["dtype"]]
        t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return t.reshape(meta["shape"])

    def get_file(self, filename: str) -> bytes:
        meta = self.manifest.files.get(filename)
        if meta is None:
            raise NotFound(f"no file {filename!r} in {self.path}")
        with self.read_txn() as txn:
            raw = txn.get(file_key(filename))
        if raw is None or (self.verify and crc32(raw) != meta["crc32"]):
            raise ChecksumError(f"file record {filename!r} is missing or fails its checksum")
        return raw

    def export_files(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer/config files to ``directory`` (for AutoTokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.manifest.files:
            (directory / name).write_bytes(self.get_file(name))
        return directory


def _check_out(what: str, dest: np.ndarray, m: int, size: int) -> np.ndarray:
    if dest.shape != (m, size) or dest.dtype != np.uint8 or not dest.flags.c_contiguous:
        raise InvalidArgument(f"{what} needs a contiguous uint8 [{m}, {size}] buffer, got {dest.dtype} {list(dest.shape)}")
    return dest
