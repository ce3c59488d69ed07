"""The one bridge from a NeuronStore to the pure-torch model: dense tensors,
config, tokenizer files and the neuron bank."""
from __future__ import annotations

import logging
import tempfile

import torch

from m2cache.store.reader import NeuronStore
from m2cache.model.config import ModelConfig
from m2cache.model.model import CausalLM
from m2cache.model.providers import WeightBank

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(store: NeuronStore):
    """AutoTokenizer from the store's files (offline), or None if it has none."""
    if not any(name in store.manifest.files for name in TOKENIZER_FILES):
        log.info("store %s has no tokenizer files", store.path)
        return None
    import transformers  # heavy; only needed here

    with tempfile.TemporaryDirectory(prefix="m2cache-tok-") as tmp:
        store.export_files(tmp)
        return transformers.AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def load_model(store: NeuronStore, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[CausalLM, object, WeightBank]:
    """(model with the store's dense tensors, tokenizer or None, lazily-decoded neuron bank)."""
    config = ModelConfig.from_hf(store.manifest.hf_config)
    dense = {name: store.get_dense(name) for name in store.dense_names()}
    model = CausalLM(config, dense, device, dtype)
    return model, load_tokenizer(store), WeightBank.from_store(store, device)
