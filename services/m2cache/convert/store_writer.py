"""The low-level writer of one store directory in format 2 (codec/format.py):
segments of neuron records appended to ``neurons.bin``, everything else (CRC-32C
tables, segment table, bitmap offsets, dense tensors, files, manifest) in LMDB.

Used by the converter (convert/writer.py) and by benchmarks and tests that build
synthetic stores. It writes into the directory it is given; making that atomic
(a temp directory renamed into place) is the caller's job, and ``finish`` fsyncs
both files and writes the manifest last.
"""
from __future__ import annotations

import os
from pathlib import Path

import lmdb
import numpy as np

from m2cache.codec import checksum
from m2cache.codec.format import (
    MANIFEST_KEY, RECORDS_FILE, SEGMENT_ALIGN, Manifest, Precision, crc_key, dense_key, file_key, offsets_key,
    pack_segment, segment_key,
)


class Segment:
    """One (layer, precision) being written: records appended in neuron order."""

    def __init__(self, layer: int, prec: Precision, offset: int, variable: bool):
        self.layer, self.prec, self.offset = layer, prec, offset
        self.nbytes = 0
        self.variable = variable
        self.crcs: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []


class StoreWriter:
    """Writes ``directory``/neurons.bin and ``directory``/data.mdb; not thread-safe."""

    def __init__(self, directory: str | os.PathLike, map_size: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # No lock file (private directory, single writer); synced once in finish().
        self.env = lmdb.open(str(self.directory), map_size=map_size, subdir=True, lock=False, sync=False,
                             metasync=False, readahead=False)
        self.records = open(self.directory / RECORDS_FILE, "wb")
        self.offset = 0

    # ---- neuron records ---------------------------------------------------------
    def begin_segment(self, layer: int, prec: Precision, variable: bool = False) -> Segment:
        """Start the segment of (layer, prec) at the next aligned offset; ``variable``
        for bitmap-codec records (their offsets are stored)."""
        pad = -self.offset % SEGMENT_ALIGN
        if pad:
            self.records.write(b"\0" * pad)
            self.offset += pad
        return Segment(layer, prec, self.offset, variable)

    def add_rows(self, seg: Segment, rows: np.ndarray) -> np.ndarray:
        """Append fixed-size records ``rows`` uint8 [n, record_bytes]; returns their CRC-32Cs."""
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        crcs = checksum.crc32c_rows(rows)
        self._append(seg, rows.reshape(-1), crcs, np.full(rows.shape[0], rows.shape[1], dtype=np.int64))
        return crcs

    def add_values(self, seg: Segment, values: list[bytes]) -> np.ndarray:
        """Append variable-size stored records (bitmap codec); returns their CRC-32Cs."""
        crcs = np.fromiter((checksum.crc32c(v) for v in values), dtype=np.uint32, count=len(values))
        lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
        self._append(seg, np.frombuffer(b"".join(values), dtype=np.uint8), crcs, lengths)
        return crcs

    def _append(self, seg: Segment, flat: np.ndarray, crcs: np.ndarray, lengths: np.ndarray) -> None:
        self.records.write(memoryview(flat))
        self.offset += flat.nbytes
        seg.nbytes += flat.nbytes
        seg.crcs.append(crcs)
        seg.lengths.append(lengths)

    def end_segment(self, seg: Segment) -> None:
        """Commit the segment's table entries (segment, CRC table, offsets) in one transaction."""
        crcs = np.concatenate(seg.crcs) if seg.crcs else np.empty(0, np.uint32)
        with self.env.begin(write=True) as txn:
            txn.put(segment_key(seg.layer, seg.prec), pack_segment(seg.offset, seg.nbytes))
            txn.put(crc_key(seg.layer, seg.prec), crcs.astype("<u4").tobytes())
            if seg.variable:
                lengths = np.concatenate(seg.lengths) if seg.lengths else np.empty(0, np.int64)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<u8")
                txn.put(offsets_key(seg.layer, seg.prec), offsets.tobytes())

    # ---- everything else -----------------------------------------------------------
    def put_dense(self, name: str, raw) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(dense_key(name), raw)

    def put_file(self, name: str, data: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(file_key(name), data)

    def finish(self, manifest: Manifest) -> None:
        """Flush and fsync neurons.bin, then write the manifest last and sync LMDB."""
        self.records.flush()
        os.fsync(self.records.fileno())
        manifest.records_file_bytes = self.offset
        with self.env.begin(write=True) as txn:  # its presence marks a finished store
            txn.put(MANIFEST_KEY, manifest.to_json())
        self.env.sync(True)

    def close(self) -> None:
        self.records.close()
        self.env.close()
