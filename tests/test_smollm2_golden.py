"""Golden test on a real pretrained model: SmolLM2-135M-Instruct converted from
its GGUF (fp16, the default) and run through m2cache at full precision equals
transformers loading the same GGUF (``from_pretrained(dir, gguf_file=...)``).

Like dtypes: transformers dequantises the GGUF to float32; the store holds those
values rounded to float16 (the converter's default). Rounding transformers'
weights to float16 too gives both sides bit-identical weights (checked tensor by
tensor), and both then compute in float32: only the order of the float32 sums
differs, so greedy tokens must be identical and logits equal to within fp32
rounding (measured against a float64 run, see ``_fp32_tolerance``).

The GGUF is Q4_1 (embeddings Q8_0): dequantised 4-bit weights, so INT4 is
nearly free on this model; nothing here measures INT4 fidelity."""
from __future__ import annotations

import pytest
import torch
import transformers

from m2cache.codec.format import Precision
from m2cache.model.generate import generate
from m2cache.local.loader import load_model
from m2cache.model.providers import FullProvider
from m2cache.store.reader import NeuronStore
from smollm2 import smollm2_gguf

PROMPT = "The history of the city begins in the Middle Ages, when"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def sides(smollm2_store):
    """(m2cache model, tokenizer, bank, store) and transformers' model with fp16-rounded weights."""
    gguf = smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.half().float())  # exactly the store's float16 values, computed in float32
    store = NeuronStore(smollm2_store)
    model, tok, bank = load_model(store, dtype=torch.float32)  # transformers' arithmetic (the default is fp16)
    yield (model, tok, bank, store), hf.eval()
    store.close()


def test_weights_are_bit_identical(sides):
    (model, _tok, bank, store), hf = sides
    state = hf.state_dict()
    m = store.manifest
    assert (m.dtype, m.num_layers, m.d_model, m.d_ffn, m.hf_config["tie_word_embeddings"]) == \
        ("float16", 30, 576, 1536, True)
    assert "lm_head.weight" not in store.dense_names()  # tied: no output tensor in the GGUF
    for name in store.dense_names():
        assert torch.equal(store.get_dense(name).float(), state[name]), name  # q/k permutation undone
    for layer in (0, 17, 29):
        v = bank.vectors(layer, Precision.FULL)  # [F, 3, d]: gate row, up row, down column
        mlp = f"model.layers.{layer}.mlp."
        assert torch.equal(v[:, 0], state[mlp + "gate_proj.weight"])
        assert torch.equal(v[:, 1], state[mlp + "up_proj.weight"])
        assert torch.equal(v[:, 2], state[mlp + "down_proj.weight"].T)


def test_greedy_tokens_and_logits_equal_transformers(sides, smollm2_store):
    (model, tok, bank, store), hf = sides
    prompt = list(tok(PROMPT).input_ids)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):].tolist()
    got = generate(model, prompt, NEW_TOKENS, FullProvider(bank))
    assert len(want) == NEW_TOKENS and got == want, (tok.decode(got), tok.decode(want))

    ids = torch.tensor([prompt + got])  # [1, T]: every position of prompt and answer
    with torch.no_grad():
        ref = hf(ids).logits[0].float()  # [T, V]
    ours = _forward(model, bank, ids)
    tol = _fp32_tolerance(store, bank, ids, ref)
    torch.testing.assert_close(ours, ref, atol=tol, rtol=0)


def _forward(model, bank, ids: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(1, ids.shape[1])
    return model.forward(ids, cache, [cache.allocate()], FullProvider(bank))[0]  # [T, V]


def _fp32_tolerance(store, bank, ids: torch.Tensor, ref: torch.Tensor) -> float:
    """The logit tolerance from the arithmetic itself.

    transformers and m2cache run the same float32 operations on the same weights
    in different summation orders (other GEMM blockings, SDPA vs explicit
    attention, neuron-major FFN); each order lies within float32 rounding of the
    exact result. The same weights in float64 measure how far transformers'
    float32 logits are from exact on this model and input; two orders differ by
    at most twice that, and x2 is the slack of a rounding bound."""
    model64, _tok, bank64 = load_model(store, dtype=torch.float64)
    exact = _forward(model64, bank64, ids).double()
    worst = float((ref.double() - exact).abs().max())
    return 4 * max(worst, 1e-6)
