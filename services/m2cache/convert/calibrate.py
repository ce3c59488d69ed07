"""Wanda calibration: per-layer norms of the FFN input features over calibration
text, measured with the reference model (m2cache.model) on the unpruned
checkpoint before conversion starts.

Streaming-friendly: the dense tensors stay resident, but a layer's FFN weights
are read from the checkpoint only while that layer computes (one layer at a
time), and only the running sums of squares [num_layers, d] are kept.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from m2cache.convert.checkpoint import Checkpoint
from m2cache.errors import InvalidArgument
from m2cache.model.config import ModelConfig
from m2cache.model.eval import negative_log_likelihood
from m2cache.model.ffn import vectors_ffn
from m2cache.model.model import CausalLM

log = logging.getLogger(__name__)


class NormCollector:
    """FFN provider that accumulates sum(x_j^2) of each layer's FFN input and
    computes with that layer's full unpruned neurons, read on demand."""

    def __init__(self, ckpt: Checkpoint, layer_neurons):
        self.ckpt = ckpt
        self.layer_neurons = layer_neurons  # (ckpt, layer) -> (vectors [F, nvec, d], bias [F] | None)
        self.sum_sq = torch.zeros(ckpt.arch.num_layers, ckpt.arch.d_model, dtype=torch.float64)  # [L, d]
        self.num_tokens = torch.zeros(ckpt.arch.num_layers, dtype=torch.long)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, d] post-norm FFN input -> the layer's FFN output
        self.sum_sq[layer] += x.double().pow(2).sum(dim=(0, 1)).cpu()
        self.num_tokens[layer] += x.shape[0] * x.shape[1]
        vectors, bias = self.layer_neurons(self.ckpt, layer)
        return vectors_ffn(x, vectors.float().to(x.device), None if bias is None else bias.to(x.device),
                           "relu" if vectors.shape[1] == 2 else "swiglu")

    def norms(self) -> list[torch.Tensor]:
        """Per layer ||X_j||_2 over every calibration token -> [d] float32 each."""
        return [row.sqrt().float() for row in self.sum_sq]


def calibration_ids(ckpt: Checkpoint, text: str | Path, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` token ids of the calibration text (the checkpoint's tokenizer)."""
    import transformers  # heavy; only needed here

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir), local_files_only=True)
    except Exception as err:  # transformers raises many types for a missing tokenizer
        raise InvalidArgument(f"wanda calibration needs the checkpoint's tokenizer in {ckpt.path}: {err}") from err
    ids = tokenizer(Path(text).read_text()).input_ids[:max_tokens]
    if len(ids) < 2:
        raise InvalidArgument(f"calibration text {text} holds fewer than 2 tokens")
    return ids


def input_norms(ckpt: Checkpoint, text: str | Path, layer_neurons, max_tokens: int = 65536,
                context: int = 256) -> list[torch.Tensor]:
    """Per layer ||X_j|| [d] of the FFN input over the calibration text."""
    ids = calibration_ids(ckpt, text, max_tokens)
    config = ModelConfig.from_hf(ckpt.config)
    context = min(context, config.max_position_embeddings)
    model = CausalLM(config, {name: ckpt.read(name) for name in ckpt.dense_names()})
    collector = NormCollector(ckpt, layer_neurons)
    nll, count = negative_log_likelihood(model, ids, collector, context, batch_size=64)
    log.info("wanda calibration: %d tokens, unpruned perplexity %.3f", count, torch.tensor(nll / count).exp())
    return collector.norms()
