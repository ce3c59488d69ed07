"""Hugging Face checkpoint -> m2cache store (format 2, see codec/format.py):
neuron records in segments of ``neurons.bin``, the rest in LMDB
(convert/store_writer.py).

Streaming: one layer's FFN tensors (or one dense tensor) are in memory at a
time, and neurons are encoded in chunks. Atomic: the store is written into a
sibling temp directory, the manifest last, then fsynced and renamed into place;
any failure (or Ctrl-C) removes the temp directory, so a store directory that
opens is always a finished one.

With ``prune`` (convert/prune.py) every neuron vector is pruned before encoding;
Wanda's input norms are measured first (convert/calibrate.py), then the layers are
converted. With ``codec="bitmap"`` (the default when pruning) each record is
stored in its bitmap sparse form where that is smaller (codec/bitmap.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from m2cache.codec import bitmap
from m2cache.convert.checkpoint import Checkpoint, open_checkpoint
from m2cache.codec.format import CODECS, DTYPES, Manifest, Precision, RecordLayout, crc32, int4_group_size
from m2cache.convert.prune import PruneSpec, prune_vectors
from m2cache.convert.store_writer import Segment, StoreWriter
from m2cache.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_CHUNK_NEURONS = 1024
_PAGE = 4096


def convert(hf_dir: str | os.PathLike, store_dir: str | os.PathLike, *, force: bool = False,
            progress: bool = True, chunk_neurons: int = DEFAULT_CHUNK_NEURONS, prune: PruneSpec | None = None,
            codec: str | None = None, dtype: str | None = None) -> Manifest:
    """Convert the checkpoint at ``hf_dir`` (an HF directory or a GGUF file) into a new store at ``store_dir``.

    Raises CheckpointError / UnsupportedArchitecture for bad input (before
    anything is written) and FailedPrecondition if ``store_dir`` exists and
    ``force`` is false. With ``force`` an existing store is replaced only once
    the new one is complete. ``prune`` prunes the FFN neurons; ``codec`` is
    "dense" or "bitmap" (default: bitmap when pruning, else dense). ``dtype``
    (GGUF only): float16 (default), bfloat16 or float32.
    """
    if chunk_neurons < 1:
        raise InvalidArgument(f"chunk_neurons must be >= 1, got {chunk_neurons}")
    codec = codec or ("bitmap" if prune is not None else "dense")
    if codec not in CODECS:
        raise InvalidArgument(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    start = time.monotonic()
    ckpt = open_checkpoint(hf_dir, dtype, progress)
    target = Path(store_dir)
    if target.exists() and not force:
        raise FailedPrecondition(f"{target} already exists; use --force (force=True) to replace it")
    plan = _Plan(codec, prune, _input_norms(ckpt, prune))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a store is an ordinary directory
        manifest = _write_store(ckpt, tmp, progress, chunk_neurons, plan)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s -> %s in %.1f s", ckpt.path, target, time.monotonic() - start)
    return manifest


def new_manifest(ckpt: Checkpoint) -> Manifest:
    """The manifest of ``ckpt``'s store, before dense tensors and files are added."""
    a = ckpt.arch
    return Manifest(family=a.family, hf_config=ckpt.config, dtype=ckpt.dtype, num_layers=a.num_layers,
                    d_model=a.d_model, d_ffn=a.d_ffn, ffn_kind=a.ffn_kind, int4_group=int4_group_size(a.d_model),
                    source=str(ckpt.path.resolve()))


@dataclass(frozen=True, slots=True)
class _Plan:
    """How neurons are transformed and stored: codec, pruning, Wanda norms per layer."""

    codec: str = "dense"
    prune: PruneSpec | None = None
    norms: list[torch.Tensor] | None = None  # [d] per layer (wanda)

    def neurons(self, ckpt: Checkpoint, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's neurons as stored: [d_ffn, nvec, d] (pruned when asked) + bias."""
        vectors, bias = layer_neurons(ckpt, layer)
        if self.prune is not None:
            vectors = prune_vectors(vectors, self.prune.sparsity, None if self.norms is None else self.norms[layer])
        return vectors, bias


def _input_norms(ckpt: Checkpoint, prune: PruneSpec | None) -> list[torch.Tensor] | None:
    if prune is None or prune.method != "wanda":
        return None
    from m2cache.convert.calibrate import input_norms  # runs the reference model

    return input_norms(ckpt, prune.text, layer_neurons, prune.max_tokens, prune.context)


def _write_store(ckpt: Checkpoint, directory: Path, progress: bool, chunk_neurons: int,
                 plan: _Plan = _Plan()) -> Manifest:
    manifest = new_manifest(ckpt)
    manifest.codec = plan.codec
    manifest.prune = plan.prune.to_manifest() if plan.prune is not None else {}
    layout = manifest.layout
    writer = StoreWriter(directory, _map_size(ckpt, layout))
    try:
        with tqdm(total=ckpt.total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
            for layer in range(manifest.num_layers):
                largest = _write_layer(writer, ckpt, layer, layout, chunk_neurons, plan)
                for name, size in largest.items():
                    manifest.max_record_bytes[name] = max(size, manifest.max_record_bytes.get(name, 0))
                bar.update(sum(ckpt.tensors[n].nbytes for n in ckpt.ffn_names(layer).values()))
            for name in ckpt.dense_names():
                manifest.dense[name] = _write_dense(writer, ckpt, name)
                bar.update(ckpt.tensors[name].nbytes)
        manifest.files = _write_files(writer, ckpt)
        writer.finish(manifest)  # manifest last: its presence marks a finished store
    finally:
        writer.close()
    _fsync_dir(directory)
    return manifest


def _map_size(ckpt: Checkpoint, layout: RecordLayout) -> int:
    """Generous LMDB map size (the file is sparse): dense tensors and files twice over,
    plus the per-layer tables (CRC-32C and bitmap offsets: 12 B per neuron and precision)."""
    tables = ckpt.arch.num_layers * len(Precision) * (ckpt.arch.d_ffn * 12 + 3 * _PAGE)
    return 2 * (ckpt.total_bytes + tables) + (256 << 20)


# ---- FFN neurons --------------------------------------------------------------
def _write_layer(writer: StoreWriter, ckpt: Checkpoint, layer: int, layout: RecordLayout, chunk: int,
                 plan: _Plan) -> dict[str, int]:
    """All neuron records of one layer in the three precisions, one segment each,
    encoded a chunk of neurons at a time; returns the largest stored record per precision name."""
    vectors, bias = plan.neurons(ckpt, layer)  # [d_ffn, nvec, d], [d_ffn] | None
    d_ffn = vectors.shape[0]
    largest = {}
    for prec in Precision:
        spec = bitmap.element_spec(layout, prec) if plan.codec == "bitmap" else None
        seg = writer.begin_segment(layer, prec, variable=spec is not None)
        for lo in range(0, d_ffn, chunk):
            hi = min(lo + chunk, d_ffn)
            records = layout.encode(vectors[lo:hi], None if bias is None else bias[lo:hi], prec)  # [n, bytes]
            if spec is None:
                size = records.shape[1]
                _put_records(writer, seg, records.numpy())
            else:
                values = bitmap.encode(records, spec)
                size = max(len(v) for v in values)
                _put_records(writer, seg, values)
            largest[prec.name.lower()] = max(largest.get(prec.name.lower(), 0), size)
        writer.end_segment(seg)
    log.debug("layer %d: %d neurons written", layer, d_ffn)
    return largest


def layer_neurons(ckpt: Checkpoint, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's neurons as vectors [d_ffn, nvec, d] in the checkpoint dtype (+ fc1 bias [d_ffn] for OPT).

    Filled one weight at a time so peak memory is the layer plus one tensor;
    the output projection is transposed here once, not per chunk.
    """
    names = ckpt.ffn_names(layer)
    a = ckpt.arch
    # SwiGLU: gate, up [d_ffn, d] and down [d, d_ffn]; ReLU: fc1 [d_ffn, d] and fc2 [d, d_ffn].
    rows, cols = (("gate", "up"), "down") if a.family == "llama" else (("fc1",), "fc2")
    vectors = torch.empty(a.d_ffn, len(rows) + 1, a.d_model, dtype=DTYPES[ckpt.dtype])
    for k, role in enumerate(rows):
        vectors[:, k] = ckpt.read(names[role])
    vectors[:, -1] = ckpt.read(names[cols]).T
    bias = ckpt.read(names["fc1_bias"]) if a.family == "opt" else None
    return vectors, bias


def _put_records(writer: StoreWriter, seg: Segment, records) -> None:
    """Append one chunk of records to the segment: rows [n, bytes] (dense) or stored values (bitmap)."""
    if isinstance(records, np.ndarray):
        writer.add_rows(seg, records)
    else:
        writer.add_values(seg, records)


# ---- dense tensors and files ----------------------------------------------------
def _write_dense(writer: StoreWriter, ckpt: Checkpoint, name: str) -> dict:
    """One dense tensor as raw bytes in its checkpoint dtype; returns its manifest entry."""
    tensor = ckpt.read(name)
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    writer.put_dense(name, raw)
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), "crc32": crc32(raw)}


def _write_files(writer: StoreWriter, ckpt: Checkpoint) -> dict:
    entries = {}
    for path in ckpt.aux_files():
        data = path.read_bytes()
        writer.put_file(path.name, data)
        entries[path.name] = {"crc32": crc32(data), "size": len(data)}
    return entries


# ---- atomic placement -------------------------------------------------------------
def _replace(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``; an existing target is removed only afterwards."""
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / "old"
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
