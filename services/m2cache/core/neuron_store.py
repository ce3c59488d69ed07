"""Read side of an LMDB neuron store (the SSD tier). No grpc here: the
NeuronStore service and the in-process path both use this class."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import lmdb
import numpy as np
import torch

from m2cache.core.format import (
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


class NeuronStore:
    """One converted model. ``get_neurons`` returns the concatenated records of
    many neurons of one layer at one precision, checksum-verified."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise StoreNotFound(f"no m2cache store at {self.path} (missing data.mdb)")
        # readahead off: neuron reads are small and random; lock off: read-only sharing.
        self.env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, max_readers=512, subdir=True)
        self.verify = verify
        with self.env.begin(buffers=False) as txn:
            raw = txn.get(MANIFEST_KEY)
        if raw is None:
            raise StoreNotFound(f"{self.path} has no manifest: not a finished m2cache store")
        self.manifest = Manifest.from_json(raw, where=str(self.path))
        self.layout = self.manifest.layout
        self._crc_tables: dict[tuple[int, Precision], np.ndarray] = {}

    def close(self) -> None:
        self.env.close()

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
            with self.env.begin() as txn:
                raw = txn.get(crc_key(layer, prec))
            if raw is None:
                raise NotFound(f"no checksum table for layer {layer} {prec.name}")
            table = self._crc_tables[key] = np.frombuffer(raw, dtype="<u4")
        return table

    def get_neurons(self, layer: int, neuron_ids, prec: Precision | int | str) -> bytes:
        """Concatenated records, in ``neuron_ids`` order."""
        prec = Precision.parse(prec)
        self.check_layer(layer)
        ids = self.check_neurons(neuron_ids)
        size = self.layout.num_bytes(prec)
        out = bytearray(size * ids.size)
        table = self.crc_table(layer, prec) if self.verify else None
        with self.env.begin(buffers=True) as txn:
            for i, nid in enumerate(ids.tolist()):
                rec = txn.get(neuron_key(layer, prec, nid))
                if rec is None or len(rec) != size:
                    raise ChecksumError(f"record layer {layer} neuron {nid} {prec.name} is missing or truncated")
                if table is not None and crc32(rec) != table[nid]:
                    raise ChecksumError(f"record layer {layer} neuron {nid} {prec.name} fails its checksum")
                out[i * size : (i + 1) * size] = rec
        return bytes(out)

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
        with self.env.begin() as txn:
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
        with self.env.begin() as txn:
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
