"""Tiny random-init Hugging Face checkpoints of every supported family, built
from transformers configs (no downloads), and paths to the real shared models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

# ../shared beside the checkout; M2CACHE_SHARED points elsewhere (a GPU machine gets a copy)
SHARED = Path(os.environ.get("M2CACHE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
REAL_MODELS = ("tinystories-656k", "stories260k")


def shared_path(*parts: str) -> Path:
    """A file or folder under ../shared; fails loudly (never skips) if absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"required shared data missing: {path} (tests need ../shared beside the checkout)")
    return path


def real_model_dir(name: str) -> Path:
    return shared_path("models", name)


def corpus(name: str) -> Path:
    return shared_path("corpora", *name.split("/"))


TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, sliding_window=None,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
    ),
}


def make_tiny_checkpoint(family: str, out_dir: Path, dtype: torch.dtype = torch.float32, seed: int = 0,
                         max_shard_size: str | None = None, config: transformers.PretrainedConfig | None = None) -> Path:
    """Save a random-init model of ``family`` to ``out_dir`` (safetensors + config.json);
    ``config`` overrides TINY_CONFIGS[family] (e.g. a variant with llama3 rope scaling)."""
    torch.manual_seed(seed)
    config = config if config is not None else TINY_CONFIGS[family]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init leaves biases and norms at trivial values; perturb every tensor
    # so a mixed-up weight (wrong bias, wrong norm) changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return out_dir
