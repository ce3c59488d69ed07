"""Read side of an LMDB neuron store (the SSD tier). No grpc here: the
NeuronStore service and the in-process path both use this class.

Records are handed out dense (``get_neurons``) or as stored (``get_records``:
bitmap-compressed where the store's codec is "bitmap", with their lengths)."""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np
import torch

from m2cache.codec import bitmap
from m2cache.codec.format import (
    MANIFEST_KEY,
    Manifest,
    Precision,
    DTYPES,
    crc32,
    crc_key,
    dense_key,
    file_key,
    neuron_key,
)
from m2cache.errors import ChecksumError, InvalidArgument, NotFound, StoreNotFound

log = logging.getLogger(__name__)


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


class NeuronStore:
    """One converted model. ``get_neurons`` returns the concatenated records of
    many neurons of one layer at one precision, checksum-verified."""

    def __new__(cls, path: str | os.PathLike, verify: bool = True):
        key = Path(path).resolve()
        with _OPEN_LOCK:
            store = _OPEN.get(key)
            if store is None:
                store = super().__new__(cls)
                store._refs = 0
                store._open(key, verify)
                _OPEN[key] = store
            store._refs += 1
            return store

    def _open(self, path: Path, verify: bool) -> None:
        self.path = path
        if not (self.path / "data.mdb").is_file():
            raise StoreNotFound(f"no m2cache store at {self.path} (missing data.mdb)")
        self.env = _open_env(self.path)
        self.verify = verify
        with self.read_txn() as txn:
            raw = txn.get(MANIFEST_KEY)
        if raw is None:
            raise StoreNotFound(f"{self.path} has no manifest: not a finished m2cache store")
        self.manifest = Manifest.from_json(raw, where=str(self.path))
        self.layout = self.manifest.layout
        self._crc_tables: dict[tuple[int, Precision], np.ndarray] = {}

    def close(self) -> None:
        """Release this user's share; the environment closes with the last one."""
        with _OPEN_LOCK:
            self._refs -= 1
            if self._refs > 0:
                return
            _OPEN.pop(self.path, None)
        self.env.close()

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

    # ---- neurons ----------------------------------------------------------
    def crc_table(self, layer: int, prec: Precision) -> np.ndarray:
        key = (layer, prec)
        table = self._crc_tables.get(key)
        if table is None:
            with self.read_txn() as txn:
                raw = txn.get(crc_key(layer, prec))
            if raw is None:
                raise NotFound(f"no checksum table for layer {layer} {prec.name}")
            table = self._crc_tables[key] = np.frombuffer(raw, dtype="<u4")
        return table

    def get_neurons(self, layer: int, neuron_ids, prec: Precision | int | str) -> bytes:
        """Concatenated dense records, in ``neuron_ids`` order (bitmap records decoded)."""
        prec = Precision.parse(prec)
        payload, lengths = self.get_records(layer, neuron_ids, prec)
        if self.manifest.codec == "dense":
            return payload
        return bitmap.decode_bytes(payload, lengths, bitmap.element_spec(self.layout, prec)).numpy().tobytes()

    def get_records(self, layer: int, neuron_ids, prec: Precision | int | str) -> tuple[bytes, np.ndarray]:
        """Concatenated records as stored, in ``neuron_ids`` order, and their lengths [n]."""
        prec = Precision.parse(prec)
        self.check_layer(layer)
        ids = self.check_neurons(neuron_ids)
        size, codec = self.layout.num_bytes(prec), self.manifest.codec
        parts, lengths = [], np.empty(ids.size, dtype=np.int64)
        table = self.crc_table(layer, prec) if self.verify else None
        with self.read_txn(buffers=True) as txn:
            for i, nid in enumerate(ids.tolist()):
                rec = txn.get(neuron_key(layer, prec, nid))
                if rec is None or not bitmap.length_ok(len(rec), size, codec):
                    raise ChecksumError(f"record layer {layer} neuron {nid} {prec.name} is missing or truncated")
                if table is not None and crc32(rec) != table[nid]:
                    raise ChecksumError(f"record layer {layer} neuron {nid} {prec.name} fails its checksum")
                parts.append(rec)
                lengths[i] = len(rec)
            payload = b"".join(parts)
        return payload, lengths

    def get_layer(self, layer: int, prec: Precision | int | str) -> bytes:
        """All neurons of a layer at one precision, in id order."""
        return self.get_neurons(layer, range(self.manifest.d_ffn), prec)

    def neuron_weights(self, layer: int, neuron_ids, prec) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoded float32 weights [n, nvec, d] (+ [n] bias for ReLU models)."""
        prec = Precision.parse(prec)
        return self.layout.decode_bytes(self.get_neurons(layer, neuron_ids, prec), prec)

    # ---- dense tensors and files -------------------------------------------
    def dense_names(self) -> list[str]:
        return list(self.manifest.dense)

    def get_dense_bytes(self, name: str) -> bytes:
        meta = self.manifest.dense.get(name)
        if meta is None:
            raise NotFound(f"no dense tensor {name!r} in {self.path}")
        with self.read_txn() as txn:
            raw = txn.get(dense_key(name))
        if raw is None or (self.verify and crc32(raw) != meta["crc32"]):
            raise ChecksumError(f"dense record {name!r} is missing or fails its checksum")
        return raw

    def get_dense(self, name: str) -> torch.Tensor:
        meta = self.manifest.dense[name] if name in self.manifest.dense else None
        raw = self.get_dense_bytes(name)
        assert meta is not None
        t = torch.frombuffer(bytearray(raw), dtype=DTYPES[meta["dtype"]]) if raw else torch.empty(0, dtype=DTYPES[meta["dtype"]])
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
