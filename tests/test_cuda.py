"""The CUDA path (run where CUDA is present, e.g. by scripts/gpu_check.sh on a lent
GPU machine; on a CPU-only machine there is no device to run them on): full
precision equals transformers token for token on every family, and the HBM cache
in GPU memory computes exactly what the in-process model computes."""
from __future__ import annotations

import pytest
import torch

from model_cases import CASES, build_case
from m2cache.codec.format import Precision
from m2cache.local.loader import load_model, store_fetch
from m2cache.model.generate import generate
from m2cache.model.providers import ChoiceProvider, FullProvider
from m2cache.predictors.bands import BandRatios
from m2cache.predictors.ranking import Ranker
from m2cache.worker.provider import CachedProvider
from m2cache.worker.runtime import build_cache
from worker_stack import random_predictor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", CASES)
def test_full_precision_greedy_equals_transformers_on_cuda(name, tmp_path):
    case = build_case(name, tmp_path)
    model, _tok, bank = load_model(case.store, "cuda", torch.float32)
    prompt = case.ids[:8]
    hf = case.hf_model().to("cuda")
    eos = list(model.config.eos_token_ids) or None
    with torch.no_grad():
        out = hf.generate(prompt[None].cuda(), attention_mask=torch.ones(1, 8, dtype=torch.long, device="cuda"),
                          do_sample=False, max_new_tokens=32, eos_token_id=eos, pad_token_id=(eos or [0])[0])
    assert generate(model, prompt.tolist(), 32, FullProvider(bank)) == out[0, 8:].tolist()
    case.store.close()


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_cache_in_gpu_memory_equals_the_in_process_model(fraction, tmp_path):
    case = build_case("stories260k", tmp_path)
    model, _tok, bank = load_model(case.store, "cuda")
    m = case.store.manifest
    ratios = BandRatios(0.2, 0.25, 0.25)
    choose = Ranker(random_predictor(case.store).to("cuda"), ratios).choose()
    prompt = case.ids[:6].tolist()
    want = generate(model, prompt, 24, ChoiceProvider(bank, choose))
    cache = build_cache(m, fraction, ratios.to_dict(), window=2, device="cuda")
    assert cache.slots(0, Precision.FULL).records.is_cuda
    provider = CachedProvider(cache, m.layout, store_fetch(case.store), m.num_layers)
    got = generate(model, prompt, 24, provider, before_step=lambda: provider.begin_step([choose]))
    provider.close()
    assert got == want
    case.store.close()
