"""CausalLM: the reference model. Dense weights live here; FFN neurons come
from an FFNProvider at every layer of every step, so the same forward serves
full precision, sparse mixed precision and the worker's HBM cache."""
from __future__ import annotations

import torch

from m2cache.errors import InvalidArgument
from m2cache.model.config import ModelConfig
from m2cache.model.ffn import FFNProvider
from m2cache.model.kv_cache import KVCache
from m2cache.model.llama import LlamaModel
from m2cache.model.opt import OPTModel
from m2cache.model.weights import DenseWeights

FAMILIES = {"llama": LlamaModel, "opt": OPTModel}


def attention_names(config: ModelConfig, layer: int, names) -> list[str]:
    """Of ``names`` (dense tensor names), those of layer ``layer``'s attention projections."""
    prefix = FAMILIES[config.family].layer_prefix(layer) + "self_attn."
    return [n for n in names if n.startswith(prefix)]


class CausalLM:
    """``CausalLM(config, dense, device)``; dense: Hugging Face name -> tensor
    (every non-FFN tensor, plus OPT's fc2 biases; lm_head optional when tied)."""

    def __init__(self, config: ModelConfig, dense: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, streamed_layers: frozenset[int] = frozenset()):
        """``streamed_layers``: layers whose attention projections are not in ``dense``;
        the caller installs them with ``set_attention`` before each use (the worker
        streams them through the tiers when the resident parts exceed the device budget)."""
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.net = FAMILIES[config.family](config, DenseWeights(dense, self.device, dtype), self.device,
                                           frozenset(streamed_layers))

    def set_attention(self, layer: int, tensors: dict[str, torch.Tensor] | None) -> None:
        """Install layer ``layer``'s attention projections (HF names), or drop them with None."""
        self.net.set_attention(layer, None if tensors is None else DenseWeights(tensors, self.device, self.dtype))

    def new_cache(self, num_slots: int = 1, max_len: int | None = None) -> KVCache:
        """A KV cache on this model's device and dtype (max_len: the context length by default)."""
        return KVCache.for_model(self.config, num_slots, max_len, self.device, self.dtype)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, slots: torch.Tensor | list[int],
                ffn: FFNProvider) -> torch.Tensor:
        """input_ids: [B, T] appended to cache rows ``slots`` [B] -> logits [B, T, V] (float32).

        Each row continues at its own length, so rows of different lengths
        decode together; the rows' lengths grow by T."""
        input_ids = input_ids.to(self.device)
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.device).reshape(-1)
        if input_ids.dim() != 2 or input_ids.shape[0] != slots.numel():
            raise InvalidArgument(f"input_ids {tuple(input_ids.shape)} must be [B, T] with one slot per row")
        if slots.unique().numel() != slots.numel():
            raise InvalidArgument("a slot appears twice in one batch")
        positions = cache.positions(slots, input_ids.shape[1])  # [B, T]
        logits = self.net.forward(input_ids, cache, slots, positions, ffn)
        cache.advance(slots, input_ids.shape[1])
        return logits.float()

    __call__ = forward
