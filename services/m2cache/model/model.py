"""CausalLM: the model. Dense weights live here; every layer's FFN output comes
from the FFN provider the caller hands in (dense, sparse mixed precision, the
worker's HBM cache), so one forward serves them all. The per-token path reads
top to bottom in ``forward``: embed, then per layer attention (weights resident,
or pulled from the caller's source for streamed layers), FFN input, the
provider's FFN, residual; then the head."""
from __future__ import annotations

from typing import Callable

import torch

from m2cache.errors import InvalidArgument
from m2cache.model.config import ModelConfig
from m2cache.model.ffn import FFNProvider
from m2cache.model.kv_cache import KVCache
from m2cache.model.layers import AttentionWeights, attention_dtype
from m2cache.model.llama import LlamaModel
from m2cache.model.opt import OPTModel
from m2cache.model.weights import DenseWeights, attention_weights

FAMILIES = {"llama": LlamaModel, "opt": OPTModel}
AttentionSource = Callable[[int], AttentionWeights]  # layer -> its (streamed) attention weights


def attention_names(config: ModelConfig, layer: int, names) -> list[str]:
    """Of ``names`` (dense tensor names), those of layer ``layer``'s attention projections."""
    prefix = FAMILIES[config.family].layer_prefix(layer) + "self_attn."
    return [n for n in names if n.startswith(prefix)]


class CausalLM:
    """``CausalLM(config, dense, device, dtype)``; dense: Hugging Face name -> tensor
    (every non-FFN tensor, plus OPT's fc2 biases; lm_head optional when tied)."""

    def __init__(self, config: ModelConfig, dense: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, streamed_layers: frozenset[int] = frozenset()):
        """``streamed_layers``: layers whose attention projections are not in ``dense``;
        ``forward`` pulls them from its ``attention`` source when it reaches them."""
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.streamed_layers = frozenset(streamed_layers)
        self.net = FAMILIES[config.family](config, DenseWeights(dense, self.device, dtype), self.device,
                                           self.streamed_layers)

    def attention_weights(self, layer: int, tensors: dict[str, torch.Tensor]) -> AttentionWeights:
        """A streamed layer's attention (HF-named tensors) in this model's device and dtype."""
        tensors = {k: t.to(device=self.device, dtype=self.dtype) for k, t in tensors.items()}
        return attention_weights(tensors, self.net.layer_prefix(layer), self.net.attn_out)

    def new_cache(self, num_slots: int = 1, max_len: int | None = None) -> KVCache:
        """A KV cache on this model's device, in the attention dtype (max_len: the context length by default)."""
        return KVCache.for_model(self.config, num_slots, max_len, self.device, attention_dtype(self.device, self.dtype))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, kv: KVCache, slots: torch.Tensor | list[int], ffn: FFNProvider,
                attention: AttentionSource | None = None) -> torch.Tensor:
        """input_ids: [B, T] appended to cache rows ``slots`` [B] -> logits [B, T, V] (float32).

        Each row continues at its own length, so rows of different lengths decode
        together; the rows' lengths grow by T."""
        slots = [int(s) for s in torch.as_tensor(slots).reshape(-1).tolist()]
        input_ids = input_ids.to(self.device)
        if input_ids.dim() != 2 or input_ids.shape[0] != len(slots):
            raise InvalidArgument(f"input_ids {tuple(input_ids.shape)} must be [B, T] with one slot per row")
        if len(set(slots)) != len(slots):
            raise InvalidArgument("a slot appears twice in one batch")
        if self.streamed_layers and attention is None:
            raise InvalidArgument(f"layers {sorted(self.streamed_layers)} are streamed: forward needs their source")
        net = self.net
        step = kv.step(slots, input_ids.shape[1], self.config.sliding_window)
        x, rope = net.embed_tokens(input_ids, step)  # [B, T, d]
        for i in range(self.config.num_layers):
            w = net.attn[i] if net.attn[i] is not None else attention(i)
            x, h = net.block_input(i, x, w, kv, step, rope)  # attention; h: the FFN input for the provider
            x = net.ffn_output(i, x, ffn(i, h))
        kv.advance(slots, input_ids.shape[1])
        return net.head(x).float()

    __call__ = forward
