"""Pieces of the worker's data plane: records placed into the caller's buffer
(dense, or bitmap-decoded), their CRC-32C checked in one pass per batch, and
the background reporter that tells the DramTier what this worker used.

Shapes: ``out`` is uint8 [m, record_bytes] (dense records, request order);
``rows`` are positions in it."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import numpy as np
import torch

from m2cache.codec import bitmap, checksum
from m2cache.codec.format import DTYPES, Precision, RecordLayout, crc32
from m2cache.errors import ChecksumError

log = logging.getLogger(__name__)


def place(out: np.ndarray, rows: np.ndarray, stored: bytes | memoryview, lengths: np.ndarray | None,
          crcs: np.ndarray, layout: RecordLayout, prec: Precision, ids: np.ndarray, verify: bool) -> float:
    """Put records as stored (back to back in ``stored``; ``lengths`` for bitmap
    records, None for dense) into ``out[rows]``; CRC-checked first (one hardware
    CRC over the batch against the CRC predicted from ``crcs``). Returns the
    seconds spent decoding bitmap records."""
    size = layout.num_bytes(prec)
    flat = np.frombuffer(stored, dtype=np.uint8)
    n = rows.size
    if lengths is None and flat.size != n * size or lengths is not None and int(lengths.sum()) != flat.size:
        raise ChecksumError(f"layer records {prec.name}: {flat.size} bytes for {n} records")
    if verify and checksum.crc32c(flat) != checksum.concat(crcs, size if lengths is None else lengths):
        _name_bad(flat, lengths, size, crcs, ids[rows], prec)
    if lengths is None:
        out[rows] = flat.reshape(n, size)
        return 0.0
    t0 = time.perf_counter()
    dense = bitmap.decode(torch.from_numpy(flat.copy()), torch.from_numpy(lengths.astype(np.int64)),
                          bitmap.element_spec(layout, prec))
    out[rows] = dense.numpy()
    return time.perf_counter() - t0


def check_rows(out: np.ndarray, rows: np.ndarray, crcs: np.ndarray, ids: np.ndarray, prec: Precision) -> None:
    """Dense records already in ``out[rows]``: every one's CRC-32C (one C call), the first
    that fails named."""
    size = out.shape[1]
    lengths = np.full(rows.size, size, np.int64)
    bad = np.flatnonzero(checksum.crc32c_spans(out.reshape(-1), rows * size, lengths) != crcs)
    if bad.size:
        raise ChecksumError(f"record neuron {int(ids[rows[bad[0]]])} {prec.name} arrived corrupted (CRC-32C)")


def _name_bad(flat, lengths, size, crcs, ids, prec) -> None:
    lens = np.full(ids.size, size, np.int64) if lengths is None else lengths.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    bad = np.flatnonzero(checksum.crc32c_spans(flat, starts, lens) != crcs)
    nid = int(ids[bad[0]]) if bad.size else int(ids[0])
    raise ChecksumError(f"record neuron {nid} {prec.name} arrived corrupted (CRC-32C)")


REPORT_INTERVAL_S = 0.05  # at most one usage report this often: a unary RPC costs both sides ~0.3 ms of CPU,
#                           and one per layer fetch (30 a token on SmolLM2) took a third of a core in the tier


class Reporter:
    """Sends usage reports to the DramTier from a background thread, at most one every
    ``interval_s``, batching what queued up meanwhile; drops reports while the tier is
    away (it only steers caching)."""

    def __init__(self, send: Callable[[int, list], None], max_queue: int = 1024, backoff_s: float = 1.0,
                 interval_s: float = REPORT_INTERVAL_S):
        self.send = send
        self.queue: queue.Queue = queue.Queue(max_queue)
        self.backoff_s = backoff_s
        self.interval_s = interval_s
        self.sent = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="usage-report", daemon=True)
        self._thread.start()

    def add(self, current_layer: int, use) -> None:
        try:
            self.queue.put_nowait((current_layer, use))
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        """Stop, sending what is still queued (once, best effort)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._send_queued([])

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._stop.wait(self.interval_s)  # let a few more layers' uses queue up
            if not self._send_queued([first]):
                self._stop.wait(self.backoff_s)

    def _send_queued(self, batch: list) -> bool:
        """``batch`` and whatever queued behind it in one report; False when the tier is away."""
        while True:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if not batch:
            return True
        try:
            self.send(batch[-1][0], [use for _, use in batch])
            self.sent += len(batch)
            return True
        except Exception as err:  # the tier is away: caching degrades, serving does not
            self.dropped += len(batch)
            log.debug("usage report dropped: %s", err)
            return False


def assemble_dense(chunks, verify: bool = True) -> dict[str, torch.Tensor]:
    """TensorChunk messages (consecutive chunks per tensor) -> name -> tensor, each
    assembled into one preallocated buffer and checked against its crc32."""
    out: dict[str, torch.Tensor] = {}
    buf, meta, filled = None, None, 0
    for chunk in chunks:
        if chunk.offset == 0:
            if buf is not None:
                raise ChecksumError(f"dense tensor {meta.name!r} arrived incomplete ({filled} of "
                                    f"{meta.total_bytes} B)")
            buf, meta, filled = torch.empty(chunk.total_bytes, dtype=torch.uint8), chunk, 0
        if meta is None or chunk.name != meta.name or chunk.offset != filled:
            raise ChecksumError(f"dense tensor chunk {chunk.name!r} at {chunk.offset} arrived out of order")
        n = len(chunk.data)
        if filled + n > meta.total_bytes:
            raise ChecksumError(f"dense tensor {meta.name!r} arrived with more than its {meta.total_bytes} B")
        if n:
            buf.numpy()[filled : filled + n] = np.frombuffer(chunk.data, dtype=np.uint8)
        filled += n
        if filled == meta.total_bytes:
            if verify and crc32(buf.numpy()) != meta.crc32:
                raise ChecksumError(f"dense tensor {meta.name!r} arrived corrupted")
            out[meta.name] = buf.view(DTYPES[meta.dtype]).reshape(list(meta.shape))
            buf, meta = None, None
    if buf is not None:
        raise ChecksumError(f"dense tensor {meta.name!r} arrived incomplete ({filled} of {meta.total_bytes} B)")
    return out
