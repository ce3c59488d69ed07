"""``m2cache convert model.gguf STORE`` on small GGUF files written here
(tests/gguf_files.py, the way llama.cpp writes them): every weight of the store
equals what transformers reads from the same GGUF, bit for bit, for llama
(rotary permutation undone), mistral and qwen2 and every quantisation type the
gguf package can dequantise; greedy tokens equal transformers'; dtypes, tied
embeddings, the tokenizer and chat template from the metadata, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from gguf_files import BOS, CHAT_TEMPLATE, EOS, PAD, tiny_model, write_gguf
from m2cache import cli
from m2cache.codec.format import Precision
from m2cache.convert.writer import convert
from m2cache.model.generate import generate
from m2cache.local.loader import load_model
from m2cache.model.providers import FullProvider
from m2cache.store.reader import NeuronStore

# (family, GGUF architecture, quantisation of the 2-D weights)
CASES = [
    ("llama", "llama", "F32"), ("llama", "llama", "F16"), ("llama", "llama", "BF16"), ("llama", "llama", "Q8_0"),
    ("llama", "llama", "Q4_0"), ("llama", "llama", "Q4_1"), ("llama", "llama", "Q5_1"), ("llama", "llama", "Q4_K"),
    ("llama", "llama", "Q6_K"), ("mistral", "llama", "Q5_K"), ("mistral", "llama", "Q2_K"),
    ("qwen2", "qwen2", "Q4_1"), ("qwen2", "qwen2", "Q3_K"),
]
PROMPT = [261, 70, 100, 7, 33, 120]


def _gguf(tmp_path, family, arch, qtype, **kw):
    name = "Mistral tiny" if family == "mistral" else f"tiny {family}"
    return write_gguf(tmp_path / f"{family}-{qtype}.gguf", tiny_model(family), arch, qtype, name=name, **kw)


def _hf_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("family,arch,qtype", CASES, ids=[f"{f}-{q}" for f, _a, q in CASES])
def test_weights_equal_transformers_reading_the_same_gguf(tmp_path, family, arch, qtype):
    path = _gguf(tmp_path, family, arch, qtype, tokenizer=False)
    manifest = convert(path, tmp_path / "store", progress=False, dtype="fp32")
    assert manifest.hf_config["model_type"] == family and manifest.dtype == "float32"
    state = _hf_from_gguf(path).state_dict()
    store = NeuronStore(tmp_path / "store")
    try:
        _model, _tok, bank = load_model(store)
        for name in store.dense_names():
            assert torch.equal(store.get_dense(name), state[name]), name
        for layer in range(manifest.num_layers):
            v, mlp = bank.vectors(layer, Precision.FULL), f"model.layers.{layer}.mlp."
            assert torch.equal(v[:, 0], state[mlp + "gate_proj.weight"])
            assert torch.equal(v[:, 1], state[mlp + "up_proj.weight"])
            assert torch.equal(v[:, 2], state[mlp + "down_proj.weight"].T)
    finally:
        store.close()


@pytest.mark.parametrize("family,arch,qtype", [("llama", "llama", "Q8_0"), ("mistral", "llama", "Q4_K"),
                                               ("qwen2", "qwen2", "Q4_1")])
def test_greedy_tokens_equal_transformers(tmp_path, family, arch, qtype):
    path = _gguf(tmp_path, family, arch, qtype, tokenizer=False)
    convert(path, tmp_path / "store", progress=False, dtype="fp32")
    hf = _hf_from_gguf(path)
    with torch.no_grad():
        want = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                           max_new_tokens=16, do_sample=False, eos_token_id=None)[0, len(PROMPT):].tolist()
    store = NeuronStore(tmp_path / "store")
    try:
        model, _tok, bank = load_model(store)
        assert generate(model, PROMPT, 16, FullProvider(bank), eos_token_ids=()) == want
    finally:
        store.close()


def test_rotary_permutation_is_undone_exactly(tmp_path):
    """HF llama -> GGUF F32 (q/k permuted as llama.cpp does) -> store: the original HF weights."""
    model = tiny_model("llama", seed=3, num_key_value_heads=1)  # k permuted with its own head count
    path = write_gguf(tmp_path / "f32.gguf", model, "llama", "F32", tokenizer=False)
    convert(path, tmp_path / "store", progress=False, dtype="fp32")
    store = NeuronStore(tmp_path / "store")
    try:
        for name, tensor in model.state_dict().items():
            if "mlp" not in name:
                assert torch.equal(store.get_dense(name), tensor), name
    finally:
        store.close()


def test_dtypes_tied_embeddings_and_config(tmp_path):
    path = _gguf(tmp_path, "qwen2", "qwen2", "Q8_0", tokenizer=False)
    f32 = convert(path, tmp_path / "f32", progress=False, dtype="fp32")
    for flag, name, dtype in (("fp16", "float16", torch.float16), (None, "float16", torch.float16),
                              ("bf16", "bfloat16", torch.bfloat16)):
        m = convert(path, tmp_path / f"s-{flag}", progress=False, dtype=flag)
        assert m.dtype == name and m.hf_config["torch_dtype"] == name
        a, b = NeuronStore(tmp_path / "f32"), NeuronStore(tmp_path / f"s-{flag}")
        try:
            for t in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.bias"):
                assert b.get_dense(t).dtype == dtype and torch.equal(b.get_dense(t), a.get_dense(t).to(dtype))
            full32 = a.layout.decode_bytes(a.get_layer(1, Precision.FULL), Precision.FULL)[0]
            full = b.layout.decode_bytes(b.get_layer(1, Precision.FULL), Precision.FULL)[0]
            assert torch.equal(full.to(dtype), full32.to(dtype))  # records: the fp32 values rounded once
        finally:
            a.close()
            b.close()
    c = f32.hf_config
    assert (c["model_type"], c["architectures"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
            c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"], c["tie_word_embeddings"]) == \
        ("qwen2", ["Qwen2ForCausalLM"], 256, 512, 2, 4, 2, 264, False)
    assert "lm_head.weight" in f32.dense
    tied = write_gguf(tmp_path / "tied.gguf", tiny_model("llama", tie_word_embeddings=True), "llama", "Q8_0",
                      tokenizer=False)
    m = convert(tied, tmp_path / "tied", progress=False)
    assert m.hf_config["tie_word_embeddings"] is True and "lm_head.weight" not in m.dense


def test_tokenizer_and_chat_template_from_metadata(tmp_path):
    path = _gguf(tmp_path, "llama", "llama", "Q8_0")
    manifest = convert(path, tmp_path / "store", progress=False)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(manifest.files)
    store = NeuronStore(tmp_path / "store")
    try:
        _model, tok, _bank = load_model(store)
        config = json.loads(store.get_file("config.json"))
    finally:
        store.close()
    assert config == manifest.hf_config
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, PAD)
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for sample in ("the cat sat on the mat", "Once upon a time, on the hill", text):
        assert tok(sample).input_ids == reference(sample).input_ids
    assert tok("the the").input_ids == [116, 257, 258]  # "t" "he" " the": the merges are used


def test_cli_convert_gguf_and_dtype_flag(tmp_path, capsys):
    path = _gguf(tmp_path, "llama", "llama", "Q4_0", tokenizer=False)
    assert cli.main(["convert", str(path), str(tmp_path / "store"), "--dtype", "bf16", "--no-progress"]) == 0
    assert "converted llama (llama, bfloat16): 2 layers x 512 neurons" in capsys.readouterr().out
    hf_dir = tmp_path / "hf"
    tiny_model("llama").save_pretrained(hf_dir)
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "s2"), "--dtype", "fp16"]) == 2
    assert "--dtype applies to GGUF files" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()


def test_permutation_helper_inverts_llamacpp():
    from gguf_files import llamacpp_permute
    from m2cache.convert.gguf import unpermute_rotary

    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)
    assert np.array_equal(unpermute_rotary(llamacpp_permute(w, 4), 4), w)
    assert not np.array_equal(llamacpp_permute(w, 4), w)
