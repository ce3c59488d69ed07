"""HF checkpoint -> LMDB store: contents of converted stores (every family, both
real models, fp16/bf16, sharded) checked against the safetensors files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import REAL_MODELS, TINY_CONFIGS, make_tiny_checkpoint, real_model_dir
from m2cache.convert.checkpoint import AUX_FILES
from m2cache.convert.writer import convert
from m2cache.codec.format import Precision
from m2cache.store.reader import NeuronStore
from quant_check import assert_int4_bound, assert_int8_bound

# name -> (family, dtype, max_shard_size) for tiny random checkpoints
TINY_CASES = {
    **{fam: (fam, torch.float32, None) for fam in TINY_CONFIGS},
    "llama-fp16": ("llama", torch.float16, None),
    "opt-fp16": ("opt", torch.float16, None),
    "qwen2-bf16": ("qwen2", torch.bfloat16, None),
    "llama-bf16-sharded": ("llama", torch.bfloat16, "50KB"),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


def _source_dir(case: str, workdir: Path) -> Path:
    if case in REAL_MODELS:
        return real_model_dir(case)
    family, dtype, shard = TINY_CASES[case]
    return make_tiny_checkpoint(family, workdir / f"hf-{case}", dtype=dtype, max_shard_size=shard)


def _checkpoint_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read independently of m2cache."""
    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _expected_neurons(tensors: dict, family: str, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, set]:
    """vectors [d_ffn, nvec, d] in the checkpoint dtype, fc1 bias or None, FFN tensor names."""
    if family == "llama":
        names = [f"model.layers.{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        gate, up, down = (tensors[n] for n in names)
        return torch.stack((gate, up, down.T), dim=1), None, set(names)
    names = [f"model.decoder.layers.{layer}.{n}" for n in ("fc1.weight", "fc2.weight", "fc1.bias")]
    fc1, fc2, bias = (tensors[n] for n in names)
    return torch.stack((fc1, fc2.T), dim=1), bias, set(names)


@pytest.mark.parametrize("case", [*TINY_CASES, *REAL_MODELS])
def test_store_matches_checkpoint(case, workdir):
    hf_dir = _source_dir(case, workdir)
    if case.endswith("sharded"):
        assert (hf_dir / "model.safetensors.index.json").is_file() and len(list(hf_dir.glob("*.safetensors"))) > 1
    manifest = convert(hf_dir, workdir / f"store-{case}", progress=False, chunk_neurons=37)  # ragged chunks
    tensors = _checkpoint_tensors(hf_dir)
    store = NeuronStore(workdir / f"store-{case}")
    try:
        assert store.manifest.to_json() == manifest.to_json()
        assert manifest.dtype == str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        ffn_names = _check_neurons(store, tensors)
        _check_dense(store, tensors, ffn_names)
        _check_files(store, hf_dir)
    finally:
        store.close()


def _check_neurons(store: NeuronStore, tensors: dict) -> set:
    m = store.manifest
    all_ffn = set()
    for layer in range(m.num_layers):
        vectors, bias, names = _expected_neurons(tensors, m.family, layer)
        all_ffn |= names
        assert vectors.shape == (m.d_ffn, m.layout.nvec, m.d_model)
        ids = range(m.d_ffn)
        full, b = store.neuron_weights(layer, ids, Precision.FULL)
        assert torch.equal(full, vectors.float()), f"layer {layer} FULL records differ from the checkpoint"
        int8, b8 = store.neuron_weights(layer, ids, Precision.INT8)
        assert_int8_bound(vectors, int8)
        int4, b4 = store.neuron_weights(layer, ids, Precision.INT4)
        assert_int4_bound(vectors, int4, m.int4_group)
        for got in (b, b8, b4):
            assert (got is None) == (bias is None) and (got is None or torch.equal(got, bias.float()))
    return all_ffn


def _check_dense(store: NeuronStore, tensors: dict, ffn_names: set) -> None:
    assert set(store.dense_names()) == set(tensors) - ffn_names
    for name in store.dense_names():
        got = store.get_dense(name)
        assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name]), name


def _check_files(store: NeuronStore, hf_dir: Path) -> None:
    present = {n for n in AUX_FILES if (hf_dir / n).is_file()}
    assert "config.json" in present and set(store.manifest.files) == present
    for name in present:
        assert store.get_file(name) == (hf_dir / name).read_bytes()


def test_opt_fc2_bias_is_dense(workdir):
    manifest = convert(_source_dir("opt", workdir), workdir / "store-opt-bias", progress=False)
    assert "model.decoder.layers.0.fc2.bias" in manifest.dense
    assert "model.decoder.layers.0.fc1.bias" not in manifest.dense
    assert manifest.ffn_kind == "relu" and manifest.layout.has_bias


def test_real_model_manifest(workdir):
    manifest = convert(real_model_dir("stories260k"), workdir / "store-260k-manifest", progress=False)
    assert (manifest.family, manifest.num_layers, manifest.d_model, manifest.d_ffn) == ("llama", 5, 64, 172)
    assert manifest.dtype == "float32" and manifest.ffn_kind == "swiglu"
    assert {"tokenizer.model", "tokenizer.json", "config.json"} <= set(manifest.files)
