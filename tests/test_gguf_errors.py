"""Bad GGUF input: every case fails with a typed error that says what is wrong,
before anything is written, and leaves nothing behind (no store, no temp dirs)."""
from __future__ import annotations

import numpy as np
import pytest

from gguf_files import encode, tiny_model, write_gguf
from m2cache import cli
from m2cache.convert.writer import convert
from m2cache.errors import CheckpointError, UnsupportedArchitecture


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid tiny llama GGUF (Q8_0) to damage."""
    return write_gguf(tmp_path_factory.mktemp("good") / "good.gguf", tiny_model("llama"), "llama", "Q8_0",
                      tokenizer=False)


def _fails(tmp_path, source, error, match):
    out = tmp_path / "out"
    out.mkdir(parents=True)
    with pytest.raises(error, match=match):
        convert(source, out / "store", progress=False)
    assert list(out.iterdir()) == []  # no store and no half-written temp directory


def test_bad_magic(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGML" + bytes(4096))
    _fails(tmp_path, bad, CheckpointError, "not a GGUF file")
    safetensors = tmp_path / "model.safetensors"
    safetensors.write_bytes((8).to_bytes(8, "little") + b'{"a": 1}')
    _fails(tmp_path / "b", safetensors, CheckpointError, "not a GGUF file")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated(tmp_path, good, keep):
    cut = tmp_path / "cut.gguf"
    data = good.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    _fails(tmp_path, cut, CheckpointError, "truncated")


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", tiny_model("llama"), "phi3", "Q8_0", tokenizer=False)
    _fails(tmp_path, path, UnsupportedArchitecture, "architecture 'phi3' is not supported")


def test_unsupported_quant_type(tmp_path):
    """Q8_K is a type the gguf package can write but not dequantise."""
    import gguf

    def q8k(w, qtype, rng):  # FFN weights as (random) Q8_K blocks
        if w.ndim == 2 and w.shape == (512, 256):
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
            return rng.integers(0, 255, (w.shape[0], w.shape[1] // block * size), dtype=np.uint8), \
                gguf.GGMLQuantizationType.Q8_K
        return encode(w, qtype, rng)

    path = write_gguf(tmp_path / "q8k.gguf", tiny_model("llama"), "llama", "Q8_0", tokenizer=False, encoder=q8k)
    _fails(tmp_path, path, CheckpointError, "stored as Q8_K, which the gguf package cannot dequantise")


def test_missing_and_misshapen_tensors(tmp_path):
    model = tiny_model("llama")
    missing = write_gguf(tmp_path / "missing.gguf", model, "llama", "Q8_0", tokenizer=False,
                         skip=("blk.1.ffn_up.weight",))
    _fails(tmp_path / "a", missing, CheckpointError, "model.layers.1.mlp.up_proj.weight' missing for layer 1")
    no_attn = write_gguf(tmp_path / "noattn.gguf", model, "llama", "Q8_0", tokenizer=False,
                         skip=("blk.0.attn_k.weight",))
    _fails(tmp_path / "b", no_attn, CheckpointError, "layer 0 lacks its self_attn.k_proj.weight")
    wrong = write_gguf(tmp_path / "wrong.gguf", model, "llama", "Q8_0", tokenizer=False,
                       kv={"llama.feed_forward_length": 640})
    _fails(tmp_path / "c", wrong, CheckpointError, "has shape .* implies")
    extra = write_gguf(tmp_path / "extra.gguf", model, "llama", "Q8_0", tokenizer=False,
                       extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((4, 4))})
    _fails(tmp_path / "d", extra, CheckpointError, "unexpected tensor 'blk.0.ffn_gate_exps.weight'")


def test_rope_scaling_is_refused(tmp_path):
    path = write_gguf(tmp_path / "rope.gguf", tiny_model("llama"), "llama", "Q8_0", tokenizer=False,
                      extra_tensors={"rope_freqs.weight": np.ones(32)})
    _fails(tmp_path, path, UnsupportedArchitecture, "rope scaling")


def test_unconvertible_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "tok.gguf", tiny_model("llama"), "llama", "Q8_0",
                      kv={"tokenizer.ggml.model": "no-such-tokenizer"})
    _fails(tmp_path, path, CheckpointError, "cannot build a tokenizer from the GGUF metadata")


def test_cli_reports_the_error(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a model")
    assert cli.main(["convert", str(bad), str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert "m2cache convert: error:" in err and "not a GGUF file" in err
    assert not (tmp_path / "store").exists()
