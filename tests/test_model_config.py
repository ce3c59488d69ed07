"""ModelConfig parsing, the KV cache's slot bookkeeping and the sampling
filters (checked against transformers' own logits warpers)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from checkpoints import TINY_CONFIGS
from m2cache.errors import InvalidArgument, ResourceExhausted, UnsupportedArchitecture
from m2cache.model.config import ModelConfig
from m2cache.model.generate import Sampling, _filter_top_k_top_p
from m2cache.model.kv_cache import KVCache


def test_unsupported_architecture_names_the_families():
    with pytest.raises(UnsupportedArchitecture, match="llama.*opt"):
        ModelConfig.from_hf({"model_type": "gpt2", "n_embd": 64})
    with pytest.raises(UnsupportedArchitecture, match="rope_type"):
        ModelConfig.from_hf({**TINY_CONFIGS["llama"]().to_dict(), "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(UnsupportedArchitecture, match="silu"):
        ModelConfig.from_hf({**TINY_CONFIGS["llama"]().to_dict(), "hidden_act": "gelu"})


def test_llama_family_fields():
    qwen = ModelConfig.from_hf(TINY_CONFIGS["qwen2"]().to_dict())
    assert (qwen.family, qwen.qkv_bias, qwen.o_bias, qwen.tie_word_embeddings) == ("llama", True, False, True)
    assert (qwen.num_heads, qwen.num_kv_heads, qwen.head_dim, qwen.nvec) == (4, 2, 16, 3)
    legacy = {"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 32, "rope_theta": 500.0, "rope_scaling": None}
    cfg = ModelConfig.from_hf(legacy)  # transformers 4.x layout: rope_theta at top level, explicit head_dim
    assert (cfg.rope.theta, cfg.rope.rope_type, cfg.head_dim, cfg.num_kv_heads) == (500.0, "default", 32, 4)


def test_opt_fields():
    cfg = ModelConfig.from_hf({**TINY_CONFIGS["opt"]().to_dict(), "word_embed_proj_dim": 32, "do_layer_norm_before": False})
    assert (cfg.family, cfg.ffn_kind, cfg.nvec, cfg.word_embed_proj_dim, cfg.do_layer_norm_before) == ("opt", "relu", 2, 32, False)
    assert cfg.rope is None and cfg.intermediate_size == 128


def test_kv_cache_slots_are_allocated_freed_and_reused():
    cache = KVCache(num_layers=1, num_slots=2, max_len=4, num_kv_heads=1, head_dim=2)
    a, b = cache.allocate(), cache.allocate()
    with pytest.raises(ResourceExhausted):
        cache.allocate()
    cache.advance([a], 3)
    with pytest.raises(ResourceExhausted):
        cache.step([a, b], 2, None)  # row a would reach length 5 > 4
    assert cache.step([a, b], 1, None).positions.tolist() == [[3], [0]]
    cache.free(a)
    with pytest.raises(InvalidArgument):
        cache.free(a)
    assert cache.allocate() == a and cache.length(a) == 0


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_kv_cache_holds_resident_only_the_positions_written():
    """A worker sizes its cache for the model's whole context; on CPU the memory it holds
    is the tokens written (pages fault in on first write), and unwritten rows read zero."""
    before = _rss_anon()
    cache = KVCache(num_layers=4, num_slots=2, max_len=8192, num_kv_heads=2, head_dim=64)  # 32 MiB each of k, v
    assert cache.num_bytes == 64 << 20
    assert _rss_anon() - before < 8 << 20
    step = cache.step([cache.allocate()], 8, None)
    for layer in range(4):
        cache.write(layer, step, torch.ones(1, 2, 8, 64), torch.full((1, 2, 8, 64), 2.0))
    assert _rss_anon() - before < 8 << 20  # 8 positions: one page per (layer, head) of k and v
    assert cache.k[:, 0, :, :8].eq(1).all() and cache.v[:, 0, :, :8].eq(2).all()
    assert cache.k[:, :, :, 8:].abs().sum() == 0 and cache.v[:, 1].abs().sum() == 0
    cache.k.fill_(0.5)  # the whole buffer is real memory once written
    assert _rss_anon() - before > 30 << 20


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.7), (20, 0.9), (None, 0.05)])
def test_top_k_top_p_match_transformers(top_k, top_p):
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p is not None:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = _filter_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert (~torch.isinf(got)).sum(-1).min() >= 1


def test_sampling_rejects_bad_parameters():
    for bad in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(InvalidArgument):
            Sampling(**bad)
