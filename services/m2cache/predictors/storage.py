"""Predictors and the precision policy, stored inside the model's LMDB store.

Keys (all under ``b"p"`` or the format's ``b"policy"``; converter keys are never touched):

- ``b"p/latest"``              ascii version number of the newest predictor set
- ``b"p/v{version:06d}/meta"`` JSON: version, kinds, ranks, shape + dtype + crc32 per tensor, training provenance
- ``b"p/v{version:06d}/{name}"`` raw little-endian bytes of tensor ``name`` in its resident dtype
  (float32, float16, int8 or uint8; see tensors.py; versions written before kinds existed hold float32)
- ``b"policy"``                JSON policy from the ratio search (see search.py): the workers' default
- ``b"policy/b{budget:.4f}"``  the policy searched for that budget (every budget searched is kept)

Versions only grow; old versions stay readable, so a worker holding version N
keeps working while N+1 is written. Every write is one LMDB write transaction
(the ``latest`` pointer and the tensors commit together or not at all). The
environment is opened for writing only for that transaction and closed again.
Readers pass a store path (a short-lived read-only handle) or an open
NeuronStore (its handle is reused: py-lmdb allows one per environment and
process; a write while one is open here runs in a child process).
"""
from __future__ import annotations

import json
import multiprocessing
import os
from contextlib import contextmanager
from pathlib import Path

import lmdb
import torch

from m2cache.codec.format import MANIFEST_KEY, POLICY_KEY, crc32
from m2cache.store.reader import NeuronStore
from m2cache.errors import ChecksumError, FailedPrecondition, StoreNotFound
from m2cache.predictors.predictor import Predictor
from m2cache.predictors.tensors import tensor_from_bytes, tensor_to_bytes

LATEST_KEY = b"p/latest"
_HEADROOM = 64 << 20


def _path(store) -> Path:
    """Accepts a store directory or anything with a ``.path`` (a NeuronStore)."""
    path = Path(getattr(store, "path", store))
    if not (path / "data.mdb").is_file():
        raise StoreNotFound(f"no m2cache store at {path} (missing data.mdb)")
    return path


def _version_key(version: int, name: str) -> bytes:
    return f"p/v{version:06d}/{name}".encode()


@contextmanager
def _read_txn(store):
    """A read transaction on ``store`` (a NeuronStore, or a path opened through
    NeuronStore so the process's one handle per environment is shared)."""
    if hasattr(store, "read_txn"):
        with store.read_txn() as txn:
            yield txn
        return
    opened = NeuronStore(_path(store))
    try:
        with opened.read_txn() as txn:
            yield txn
    finally:
        opened.close()


def _write(path: Path, put, *args):
    """Run ``put(txn, *args)`` in one write transaction and return its result.

    py-lmdb refuses a second handle on an environment this process already has
    open (a NeuronStore, e.g. the store service in the same ``m2cache serve``),
    so then the transaction runs in a child process."""
    try:
        return _write_here(path, put, *args)
    except _AlreadyOpen:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_write_here, (path, put, *args))


class _AlreadyOpen(Exception):
    pass


def _write_here(path: Path, put, *args):
    need = sum(len(v) for a in args if isinstance(a, dict) for v in a.values() if isinstance(v, bytes))
    # Map size: the file's size plus room for the new values (LMDB grows the file only as pages are used).
    map_size = os.path.getsize(path / "data.mdb") + 2 * need + _HEADROOM
    try:
        env = lmdb.open(str(path), map_size=map_size, subdir=True, readahead=False)
    except lmdb.Error as err:
        if "already open" in str(err):
            raise _AlreadyOpen() from None
        raise
    try:
        with env.begin(write=True) as txn:
            if txn.get(MANIFEST_KEY) is None:
                raise FailedPrecondition(f"{path} has no manifest: not a finished m2cache store")
            result = put(txn, *args)
        env.sync(True)
    finally:
        env.close()
    return result


def save_predictor(store, predictor: Predictor, meta: dict | None = None) -> int:
    """Write ``predictor`` as the store's next version; returns that version."""
    tensors, shapes = {}, {}
    for name, t in predictor.tensors().items():
        raw, dtype = tensor_to_bytes(t)
        tensors[name] = raw
        shapes[name] = {"shape": list(t.shape), "dtype": dtype, "crc32": crc32(raw)}
    record = {"num_layers": predictor.num_layers, "ranks": predictor.ranks(), "kinds": predictor.kinds,
              "num_bytes": predictor.num_bytes(), "flops_per_token": predictor.flops_per_token(),
              "d_model": predictor.d_model, "d_ffn": predictor.d_ffn, "tensors": shapes, **(meta or {})}
    version = _write(_path(store), _put_predictor, tensors, record)
    predictor.version, predictor.meta = version, {**record, "version": version}
    return version


def _put_predictor(txn, tensors: dict[str, bytes], record: dict) -> int:
    """Next version number, read and bumped inside the write transaction."""
    raw = txn.get(LATEST_KEY)
    version = (int(raw) if raw else 0) + 1
    for name, data in tensors.items():
        txn.put(_version_key(version, name), data)
    txn.put(_version_key(version, "meta"), json.dumps({**record, "version": version}, sort_keys=True).encode())
    txn.put(LATEST_KEY, str(version).encode())
    return version


def load_predictor(store, version: int | None = None) -> Predictor:
    """The stored predictor (newest unless ``version``); FailedPrecondition if none."""
    path = _path(store)
    with _read_txn(store) as txn:
        if not version:
            raw = txn.get(LATEST_KEY)
            version = int(raw) if raw else 0
        if not version:
            raise FailedPrecondition(f"store {path} has no predictors; run `m2cache train-predictor {path} --text FILE`")
        raw_meta = txn.get(_version_key(version, "meta"))
        if raw_meta is None:
            raise FailedPrecondition(f"store {path} has no predictor version {version}")
        meta = json.loads(raw_meta)
        tensors = {name: _read_tensor(txn, version, name, info) for name, info in meta["tensors"].items()}
    return Predictor.from_tensors(tensors, version, meta)


def _read_tensor(txn, version: int, name: str, info: dict) -> torch.Tensor:
    raw = txn.get(_version_key(version, name))
    if raw is None or crc32(raw) != info["crc32"]:
        raise ChecksumError(f"predictor v{version} tensor {name!r} is missing or fails its checksum")
    return tensor_from_bytes(raw, info.get("dtype", "float32"), info["shape"])


def save_policy(store, policy: dict) -> None:
    """Write the precision policy JSON (the workers' default band ratios)."""
    _write(_path(store), _put_policy, json.dumps(policy, sort_keys=True).encode())


def _put_policy(txn, raw: bytes) -> None:
    txn.put(POLICY_KEY, raw)
    budget = json.loads(raw).get("budget")
    if budget is not None:
        txn.put(_budget_key(budget), raw)


def _budget_key(budget: float) -> bytes:
    return f"policy/b{float(budget):.4f}".encode()


def load_policy(store, budget: float | None = None) -> dict | None:
    """The stored default policy (or the one searched for ``budget``), or None
    if the ratio search never ran on this store (for that budget)."""
    with _read_txn(store) as txn:
        raw = txn.get(POLICY_KEY)
        if budget is not None:
            default = json.loads(raw) if raw else None
            if default is not None and abs(float(default.get("budget", -1)) - budget) < 1e-9:
                return default
            raw = txn.get(_budget_key(budget))
    return json.loads(raw) if raw else None
