"""Model cases for the reference-model tests: every checkpoint is converted to
a real LMDB store (m2cache.convert.writer) and loaded back with load_model, so
the tests exercise checkpoint -> store -> model end to end."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from checkpoints import REAL_MODELS, corpus, make_tiny_checkpoint, real_model_dir
from m2cache.convert.writer import convert
from m2cache.store.reader import NeuronStore
from m2cache.local.loader import load_model
from m2cache.model.model import CausalLM
from m2cache.model.providers import WeightBank

# Variants beyond checkpoints.TINY_CONFIGS: llama3 rope scaling, a mistral
# sliding window shorter than the test sequence, OPT-350m style post-norm with
# project_in/out.
VARIANTS = {
    "llama3_rope": ("llama", lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral_window": ("mistral", lambda: transformers.MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=16)),
    "opt_postnorm": ("opt", lambda: transformers.OPTConfig(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=32, do_layer_norm_before=False)),
}
TINY = ("llama", "mistral", "qwen2", "opt")
CASES = REAL_MODELS + TINY + tuple(VARIANTS)
SEQ_LEN = 64


@dataclass
class Case:
    name: str
    hf_dir: Path
    store: NeuronStore
    model: CausalLM
    tokenizer: object
    bank: WeightBank
    ids: torch.Tensor  # [SEQ_LEN] test tokens: real text for real models, random for tiny ones

    def hf_model(self) -> transformers.PreTrainedModel:
        return transformers.AutoModelForCausalLM.from_pretrained(self.hf_dir, dtype=torch.float32).eval()


def checkpoint_dir(name: str, tmp: Path) -> Path:
    """The real model's directory, or a freshly written tiny checkpoint."""
    if name in REAL_MODELS:
        return real_model_dir(name)
    if name in VARIANTS:
        family, make_config = VARIANTS[name]
        return make_tiny_checkpoint(family, tmp / "hf", config=make_config())
    return make_tiny_checkpoint(name, tmp / "hf")


def eval_text() -> str:
    return corpus("tinystories/valid_500-999_eval.txt").read_text()


def build_case(name: str, tmp: Path) -> Case:
    """Convert ``name`` into a store under ``tmp`` and load the model from it."""
    hf_dir = checkpoint_dir(name, tmp)
    convert(hf_dir, tmp / "store", progress=False)
    store = NeuronStore(tmp / "store")
    model, tokenizer, bank = load_model(store)
    if tokenizer is not None:
        ids = torch.tensor(tokenizer(eval_text()[:2000]).input_ids[:SEQ_LEN])
    else:
        ids = torch.randint(3, model.config.vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(0))
    assert ids.numel() == SEQ_LEN
    return Case(name, hf_dir, store, model, tokenizer, bank, ids)
