"""Several converted models served at once: a root directory whose
subdirectories are stores (model name = subdirectory name), opened lazily,
plus the zero-copy batched record read the service is built on."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from m2cache.codec.bitmap import length_ok
from m2cache.codec.format import Precision, crc32, neuron_key
from m2cache.store.reader import NeuronStore
from m2cache.errors import ChecksumError, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)


class StoreCatalog:
    """Model name -> open :class:`NeuronStore`. Thread-safe."""

    def __init__(self, root: Path, verify: bool = True):
        self.root = Path(root)
        self.verify = verify
        self._stores: dict[str, NeuronStore] = {}
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        """Subdirectories holding a finished store (data.mdb), sorted."""
        return sorted(p.name for p in self.root.iterdir() if (p / "data.mdb").is_file())

    def get(self, model: str) -> NeuronStore:
        store = self._stores.get(model)
        if store is not None:
            return store
        if not model or "/" in model or model.startswith("."):
            raise InvalidArgument(f"bad model name {model!r}: expected a store directory name")
        with self._lock:
            if model not in self._stores:
                if not (self.root / model / "data.mdb").is_file():
                    raise NotFound(f"unknown model {model!r}; served models: {', '.join(self.models()) or 'none'}")
                self._stores[model] = NeuronStore(self.root / model, verify=self.verify)
                log.info("opened store %s", self.root / model)
            return self._stores[model]

    def close(self) -> None:
        with self._lock:
            for store in self._stores.values():
                store.close()
            self._stores.clear()


def check_batch(num_ids: int, record_bytes: int, max_ids: int, max_payload: int) -> None:
    """Refuse a batch too large for one response, with how to split it."""
    if num_ids > max_ids:
        raise ResourceExhausted(f"batch of {num_ids} neuron ids exceeds the limit of {max_ids}; split it")
    if num_ids * record_bytes > max_payload:
        raise ResourceExhausted(f"batch of {num_ids} records x {record_bytes} B exceeds the {max_payload}-byte "
                                f"payload limit; split it into batches of at most {max_payload // record_bytes} ids")


def read_records(store: NeuronStore, layer: int, prec: Precision, ids: np.ndarray
                 ) -> tuple[bytes, np.ndarray, list[int]]:
    """Concatenated records of ``ids`` as stored, their crc32s, and their lengths
    (empty for the dense codec, where every record is ``num_bytes(prec)`` long).

    Records are read as memoryviews into LMDB's map (``buffers=True``) and
    joined straight into the payload: one copy from the page cache.
    """
    size, codec = store.layout.num_bytes(prec), store.manifest.codec
    table = store.crc_table(layer, prec)
    crcs = table[ids]
    views = []
    with store.read_txn(buffers=True) as txn:
        for nid in ids.tolist():
            rec = txn.get(neuron_key(layer, prec, nid))
            if rec is None or not length_ok(len(rec), size, codec):
                raise ChecksumError(f"record layer {layer} neuron {nid} {prec.name} is missing or truncated")
            if store.verify and crc32(rec) != table[nid]:
                raise ChecksumError(f"record layer {layer} neuron {nid} {prec.name} fails its checksum")
            views.append(rec)
        payload = b"".join(views)
    return payload, crcs, [len(v) for v in views] if codec != "dense" else []
