"""The one bridge from a NeuronStore to the pure-torch model: dense tensors,
config, tokenizer files, the neuron bank, and reads of missed neurons."""
from __future__ import annotations

import logging
import tempfile

import torch

from m2cache.codec.format import Precision
from m2cache.local.memory import return_freed_memory, trim_freed_memory
from m2cache.model.config import ModelConfig
from m2cache.model.model import CausalLM
from m2cache.model.providers import WeightBank
from m2cache.model.weights import compute_dtype
from m2cache.store.reader import NeuronStore

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


def load_model(store: NeuronStore, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               drop_pages: bool = False, tokenizer: bool = True) -> tuple[CausalLM, object, WeightBank]:
    """(model with the store's dense tensors, tokenizer or None, lazily-read neuron bank);
    ``dtype`` None: the checkpoint's own (compute_dtype). ``drop_pages``: reopen the store's
    LMDB map afterwards so the dense pages leave the resident set; only where no other
    thread reads the same store meanwhile (a CLI run, one benchmark process).
    ``tokenizer`` False: skip it (callers that hand in token ids). Fixes the process's
    allocator thresholds first and trims its heaps after (local/memory.py), so the copies
    freed here leave RSS."""
    return_freed_memory()
    dtype = dtype or compute_dtype(store.manifest.dtype)
    config = ModelConfig.from_hf(store.manifest.hf_config)
    dense = {name: store.get_dense(name) for name in store.dense_names()}
    if drop_pages:  # the copies above are the model's: the mapped pages need not stay resident
        store.drop_mapped_pages()
    model = CausalLM(config, dense, device, dtype)
    del dense
    trim_freed_memory()  # the staging copies just freed lie between the weights kept
    return model, load_tokenizer(store) if tokenizer else None, WeightBank.from_store(store, device, dtype)


def store_fetch(store: NeuronStore):
    """The HBM cache's fetch, straight from a local store: (layer, prec, ids, current_layer)
    -> uint8 records [m, record_bytes] in ids order, read by the store's parallel read path
    into one buffer (``out`` when given)."""
    def fetch(layer: int, prec: Precision, ids: torch.Tensor, current_layer: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty((ids.numel(), store.layout.num_bytes(prec)), dtype=torch.uint8)
        return store.read_into(layer, prec, ids.numpy(), out)
    return fetch
