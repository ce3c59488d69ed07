"""Several converted models served at once: a root directory whose
subdirectories are stores (model name = subdirectory name), opened lazily,
plus the batch limits and chunking of the service's responses."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from m2cache.store.reader import DEFAULT_IO_THREADS, NeuronStore
from m2cache.errors import InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)


class StoreCatalog:
    """Model name -> open :class:`NeuronStore`. Thread-safe."""

    def __init__(self, root: Path, verify: bool = True, io_threads: int = DEFAULT_IO_THREADS,
                 direct_io: bool = False):
        self.root = Path(root)
        self.verify = verify
        self.io = {"io_threads": io_threads, "direct_io": direct_io}
        self._stores: dict[str, NeuronStore] = {}
        self._lock = threading.Lock()
        self._on_close: list = []

    def on_close(self, fn) -> None:
        """Run ``fn`` when the catalog closes (the service's other resources: its shared-memory socket)."""
        self._on_close.append(fn)

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
                self._stores[model] = NeuronStore(self.root / model, verify=self.verify, **self.io)
                log.info("opened store %s", self.root / model)
            return self._stores[model]

    def close(self) -> None:
        for fn in self._on_close:
            fn()
        self._on_close.clear()
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


def chunk_bounds(num_records: int, record_bytes: int, lengths: np.ndarray | None, chunk_bytes: int
                 ) -> list[tuple[int, int]]:
    """Request positions [lo, hi) of each streamed chunk: about ``chunk_bytes`` of
    records each (at least one record), from fixed ``record_bytes`` or stored ``lengths``."""
    if num_records == 0:
        return []
    if lengths is None:
        step = max(1, chunk_bytes // max(record_bytes, 1))
        return [(lo, min(lo + step, num_records)) for lo in range(0, num_records, step)]
    starts = np.concatenate([[0], np.cumsum(lengths[:-1])])
    group = starts // max(chunk_bytes, 1)
    cuts = np.flatnonzero(np.diff(group)) + 1
    edges = [0, *cuts.tolist(), num_records]
    return list(zip(edges[:-1], edges[1:]))
