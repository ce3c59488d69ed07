"""The reference model, loaded from a converted store, against transformers:
logits at every position (whole sequence and token by token through the KV
cache), greedy generation, batched decode of unequal lengths, seeded sampling."""
from __future__ import annotations

import pytest
import torch

from model_cases import CASES, build_case
from m2cache.model.generate import Sampling, generate
from m2cache.local.loader import load_model
from m2cache.model.providers import FullProvider

ATOL = 1e-4


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    c = build_case(request.param, tmp_path_factory.mktemp(request.param))
    yield c
    c.store.close()


def _forward_whole(case, ids):
    cache = case.model.new_cache(1, ids.numel())
    return case.model.forward(ids[None], cache, [cache.allocate()], FullProvider(case.bank))[0]  # [T, V]


def _forward_stepwise(case, ids):
    cache = case.model.new_cache(1, ids.numel())
    slots = [cache.allocate()]
    steps = [case.model.forward(ids[None, t : t + 1], cache, slots, FullProvider(case.bank))[0] for t in range(ids.numel())]
    assert cache.length(slots[0]) == ids.numel()
    return torch.cat(steps)  # [T, V]


def test_logits_match_transformers(case):
    with torch.no_grad():
        ref = case.hf_model()(case.ids[None]).logits[0].float()  # [T, V]
    whole, stepwise = _forward_whole(case, case.ids), _forward_stepwise(case, case.ids)
    assert whole.shape == ref.shape == (64, case.model.config.vocab_size)
    torch.testing.assert_close(whole, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(stepwise, ref, atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(case):
    prompt = case.ids[:8]
    hf = case.hf_model()
    eos = list(case.model.config.eos_token_ids) or None
    with torch.no_grad():
        out = hf.generate(prompt[None], attention_mask=torch.ones(1, 8, dtype=torch.long), do_sample=False,
                          max_new_tokens=64, eos_token_id=eos, pad_token_id=(eos or [0])[0])
    expected = out[0, 8:].tolist()
    got = generate(case.model, prompt.tolist(), 64, FullProvider(case.bank))
    assert got == expected
    if case.tokenizer is not None:  # the real models write a whole 64-token story continuation
        assert len(got) == 64


@pytest.mark.parametrize("name", ["stories260k", "opt", "mistral_window"])
def test_batched_decode_of_unequal_lengths_equals_alone(name, tmp_path):
    case = build_case(name, tmp_path)
    provider = FullProvider(case.bank)
    prompts = [case.ids[:5], case.ids[10:22], case.ids[30:50]]  # lengths 5, 12, 20
    alone = [_greedy_logits_alone(case, p, provider, steps=10) for p in prompts]  # each [10, V]
    tol = _fp32_noise(case, prompts, alone)

    cache = case.model.new_cache(num_slots=4, max_len=64)
    junk = cache.allocate()  # dirty a slot, free it: the reused row must not leak into its new sequence
    case.model.forward(case.ids[None, :40], cache, [junk], provider)
    cache.free(junk)
    slots = [cache.allocate() for _ in prompts][::-1]  # reversed: rows not in slot order
    assert junk in slots
    last = torch.stack([case.model.forward(p[None], cache, [s], provider)[0, -1] for p, s in zip(prompts, slots)])
    for step in range(10):
        for b in range(3):
            torch.testing.assert_close(last[b], alone[b][step], atol=tol, rtol=0)
        last = case.model.forward(last.argmax(-1)[:, None], cache, slots, provider)[:, -1]  # [3, V]
    assert [cache.length(s) for s in slots] == [5 + 10, 12 + 10, 20 + 10]
    case.store.close()


def _greedy_logits_alone(case, prompt, provider, steps, model=None, tokens=None):
    """Logits [steps, V] of greedy decoding ``prompt`` alone (``tokens``: force these next tokens)."""
    model = model or case.model
    cache = model.new_cache(1, 64)
    slots = [cache.allocate()]
    logits = model.forward(prompt[None], cache, slots, provider)[:, -1]
    out = []
    for step in range(steps):
        out.append(logits[0])
        nxt = logits.argmax(-1) if tokens is None else tokens[step : step + 1]
        logits = model.forward(nxt[:, None], cache, slots, provider)[:, -1]
    return torch.stack(out)


def _fp32_noise(case, prompts, alone) -> float:
    """The tolerance of batched-vs-alone logits, from the arithmetic itself.

    A batch of 3 runs other GEMM kernels/blockings than a batch of 1, so the same
    fp32 sums are accumulated in another order; each order's result lies within
    fp32 rounding of the exact value. The same lone runs in float64 (the same
    tokens) measure that rounding on this machine: two orders differ by at most
    twice it, plus the slack of a rounding bound (x2)."""
    model64, _tok, bank64 = load_model(case.store, dtype=torch.float64)
    worst = 0.0
    for prompt, ref in zip(prompts, alone):
        exact = _greedy_logits_alone(case, prompt, FullProvider(bank64), ref.shape[0], model64, ref.argmax(-1))
        worst = max(worst, float((ref.double() - exact).abs().max()))
    return 4 * max(worst, 1e-7)


def test_seeded_sampling_is_reproducible(tmp_path):
    case = build_case("stories260k", tmp_path)
    provider, prompt = FullProvider(case.bank), case.ids[:4].tolist()
    sampling = Sampling(temperature=1.0, top_k=40, top_p=0.95, seed=7)
    first = generate(case.model, prompt, 48, provider, sampling)
    assert generate(case.model, prompt, 48, provider, sampling) == first
    others = [generate(case.model, prompt, 48, provider, Sampling(1.0, 40, 0.95, seed=s)) for s in (8, 9)]
    assert any(o != first for o in others), "different seeds should give different samples"
    greedy = generate(case.model, prompt, 48, provider)
    assert generate(case.model, prompt, 48, provider, Sampling(temperature=1.0, top_k=1, seed=3)) == greedy
    assert first != greedy
    case.store.close()
