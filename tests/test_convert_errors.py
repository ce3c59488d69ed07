"""Bad checkpoints, damaged stores, interrupted conversions and the CLI: each
fails with a clear message and leaves nothing at the store path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import transformers
from safetensors.torch import load_file, save_file

import m2cache.convert.writer as convert_mod
from checkpoints import make_tiny_checkpoint
from m2cache.convert.writer import convert
from m2cache.codec.format import MANIFEST_KEY, RECORDS_FILE, Precision
from m2cache.store.reader import NeuronStore
from m2cache.errors import (
    CheckpointError, ChecksumError, FailedPrecondition, FormatVersionError, UnsupportedArchitecture,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("base")
    llama = make_tiny_checkpoint("llama", root / "llama")
    opt = make_tiny_checkpoint("opt", root / "opt")
    convert(llama, root / "store", progress=False)
    return {"llama": llama, "opt": opt, "store": root / "store"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _assert_fails_cleanly(hf_dir: Path, out_root: Path, error: type, *fragments: str) -> None:
    """convert raises ``error`` naming every fragment, and leaves out_root empty."""
    out_root.mkdir(exist_ok=True)
    with pytest.raises(error) as info:
        convert(hf_dir, out_root / "store", progress=False)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert list(out_root.iterdir()) == []


# ---- unsupported architectures ---------------------------------------------------
def test_gpt2_is_unsupported(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    _assert_fails_cleanly(tmp_path / "gpt2", tmp_path / "out", UnsupportedArchitecture, "'gpt2'", "llama", "opt")


@pytest.mark.parametrize("family, changes, reason", [
    ("llama", {"hidden_act": "gelu"}, "silu"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("opt", {"activation_function": "gelu"}, "relu"),
])
def test_unsupported_variants(base, tmp_path, family, changes, reason):
    hf = _copy(base[family], tmp_path / "hf")
    _edit_config(hf, **changes)
    _assert_fails_cleanly(hf, tmp_path / "out", UnsupportedArchitecture, reason)


# ---- broken checkpoints -------------------------------------------------------------
def test_missing_config(base, tmp_path):
    hf = _copy(base["llama"], tmp_path / "hf")
    (hf / "config.json").unlink()
    _assert_fails_cleanly(hf, tmp_path / "out", CheckpointError, "config.json")


def test_invalid_config(base, tmp_path):
    hf = _copy(base["llama"], tmp_path / "hf")
    (hf / "config.json").write_text("{not json")
    _assert_fails_cleanly(hf, tmp_path / "out", CheckpointError, "config.json", "not valid JSON")


def test_missing_safetensors(base, tmp_path):
    hf = _copy(base["llama"], tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    _assert_fails_cleanly(hf, tmp_path / "out", CheckpointError, "model.safetensors")


def test_truncated_safetensors(base, tmp_path):
    hf = _copy(base["llama"], tmp_path / "hf")
    path = hf / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_fails_cleanly(hf, tmp_path / "out", CheckpointError, "model.safetensors", "truncated")


def test_garbage_safetensors(base, tmp_path):
    hf = _copy(base["llama"], tmp_path / "hf")
    (hf / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0" + b"#" * 64)
    _assert_fails_cleanly(hf, tmp_path / "out", CheckpointError, "model.safetensors")


def test_missing_layer_tensor(base, tmp_path):
    hf = _copy(base["llama"], tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, hf / "model.safetensors")
    _assert_fails_cleanly(hf, tmp_path / "out", CheckpointError, "model.layers.2.mlp.up_proj.weight", "layer 2")


def test_shape_mismatch(base, tmp_path):
    hf = _copy(base["opt"], tmp_path / "hf")
    _edit_config(hf, ffn_dim=100)
    _assert_fails_cleanly(hf, tmp_path / "out", CheckpointError, "model.decoder.layers.0.fc1.weight", "[128, 64]")


def test_index_names_missing_shard(base, tmp_path):
    hf = make_tiny_checkpoint("llama", tmp_path / "hf", max_shard_size="50KB")
    shard = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    (hf / shard).unlink()
    _assert_fails_cleanly(hf, tmp_path / "out", CheckpointError, shard)


# ---- damaged stores -----------------------------------------------------------------
def test_a_version_1_store_is_refused_with_how_to_reconvert(base, tmp_path):
    store = _copy(base["store"], tmp_path / "store")
    with lmdb.open(str(store), map_size=1 << 30) as env, env.begin(write=True) as txn:
        manifest = json.loads(txn.get(MANIFEST_KEY))
        manifest["format_version"] = 1
        txn.put(MANIFEST_KEY, json.dumps(manifest).encode())
    with pytest.raises(FormatVersionError, match="format version 1") as info:
        NeuronStore(store)
    assert f"m2cache convert {manifest['source']} {store} --force" in str(info.value)


def _flip_byte(store: Path, layer: int, prec: Precision, neuron: int, where: int = -1) -> None:
    """Flip one bit of a stored record in neurons.bin (``where``: byte index in the record)."""
    reader = NeuronStore(store)
    try:
        offsets, lengths = reader.record_spans(layer, prec, np.asarray([neuron]))
    finally:
        reader.close()
    pos = int(offsets[0]) + (where % int(lengths[0]))
    with open(store / RECORDS_FILE, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x01]))


def test_corrupted_record_fails_its_checksum(base, tmp_path):
    store = _copy(base["store"], tmp_path / "store")
    _flip_byte(store, 1, Precision.INT8, 5)
    reader = NeuronStore(store)
    try:
        reader.get_neurons(1, [4], Precision.INT8)  # neighbours are intact
        reader.get_neurons(0, [5], Precision.INT8)
        with pytest.raises(ChecksumError, match="layer 1 neuron 5 INT8"):
            reader.get_neurons(1, [4, 5], Precision.INT8)
        with pytest.raises(ChecksumError, match="layer 1 neuron 5 INT8"):
            reader.get_layer(1, Precision.INT8)  # a whole-layer read names the record too
    finally:
        reader.close()


def test_truncated_record_file_names_the_first_missing_record(base, tmp_path):
    store = _copy(base["store"], tmp_path / "store")
    reader = NeuronStore(store)
    try:
        last = reader.manifest.num_layers - 1
        offsets, _ = reader.record_spans(last, Precision.INT4, np.asarray([60]))
    finally:
        reader.close()
    os.truncate(store / RECORDS_FILE, int(offsets[0]) + 3)  # cut inside neuron 60 of the last segment
    reader = NeuronStore(store)
    try:
        assert len(reader.get_neurons(last, list(range(60)), Precision.INT4)) > 0  # before the cut: intact
        with pytest.raises(ChecksumError, match=f"layer {last} neuron 60 INT4 is missing or truncated"):
            reader.get_neurons(last, [10, 60, 61], Precision.INT4)
    finally:
        reader.close()


# ---- interruption, existing targets ---------------------------------------------------
def _fail_after(calls: int, exc: BaseException, real):
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise exc
        return real(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("target, exc", [
    ("_put_records", KeyboardInterrupt()),  # mid-way through the neuron records
    ("_write_dense", RuntimeError("disk on fire")),  # after every layer, before the manifest
])
def test_interrupted_conversion_leaves_nothing(base, tmp_path, monkeypatch, target, exc):
    monkeypatch.setattr(convert_mod, target, _fail_after(5, exc, getattr(convert_mod, target)))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(type(exc)):
        convert(base["llama"], out / "store", progress=False, chunk_neurons=16)
    assert list(out.iterdir()) == []


def test_existing_target_needs_force(base, tmp_path):
    store = _copy(base["store"], tmp_path / "store")
    before = sorted((p.name, p.stat().st_size) for p in store.iterdir())
    with pytest.raises(FailedPrecondition, match="already exists"):
        convert(base["opt"], store, progress=False)
    assert sorted((p.name, p.stat().st_size) for p in store.iterdir()) == before
    assert convert(base["opt"], store, force=True, progress=False).family == "opt"
    reader = NeuronStore(store)
    assert reader.manifest.family == "opt"
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temp or old dirs left


def test_failed_forced_conversion_keeps_the_old_store(base, tmp_path, monkeypatch):
    store = _copy(base["store"], tmp_path / "store")
    monkeypatch.setattr(convert_mod, "_write_files", _fail_after(0, RuntimeError("boom"), convert_mod._write_files))
    with pytest.raises(RuntimeError):
        convert(base["opt"], store, force=True, progress=False)
    reader = NeuronStore(store)
    assert reader.manifest.family == "llama"
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


# ---- CLI ---------------------------------------------------------------------------
def test_cli_convert(base, tmp_path):
    # the console script of the environment running the tests (found whether or not
    # its bin/ is on PATH), as an installed user runs it
    beside = Path(sys.executable).parent / "m2cache"
    exe = str(beside) if beside.is_file() else shutil.which("m2cache")
    assert exe, f"the m2cache entry point is not installed in {sys.prefix} (pip install -e .)"
    cmd = [exe, "convert", str(base["opt"]), str(tmp_path / "store"), "--no-progress"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "3 layers x 128 neurons" in ok.stdout and "MiB" in ok.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "m2cache convert: error:" in again.stderr and "already exists" in again.stderr
