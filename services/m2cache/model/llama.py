"""Llama family (llama, mistral, qwen2): pre-RMSNorm blocks, RoPE, GQA
attention, SwiGLU FFN computed over the neurons a provider hands in."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from m2cache.model.config import ModelConfig
from m2cache.model.ffn import FFNProvider, swiglu_ffn
from m2cache.model.kv_cache import KVCache
from m2cache.model.layers import AttentionWeights, attention, rms_norm, rope_cos_sin, rope_inv_freq
from m2cache.model.weights import DenseWeights


def _attention_weights(w: DenseWeights, prefix: str) -> AttentionWeights:
    return w.attention(prefix, "o_proj")


class LlamaModel:
    """Dense weights by HF name (model.layers.{i}.self_attn.q_proj.weight, ...)."""

    def __init__(self, config: ModelConfig, w: DenseWeights, device, streamed: frozenset[int] = frozenset()):
        self.config = config
        self.embed, self.lm_head = w.embedding_and_head("model.embed_tokens.weight", config.tie_word_embeddings)
        # streamed layers' attention arrives per step via set_attention (None until then)
        self.attn = [None if i in streamed else _attention_weights(w, self.layer_prefix(i))
                     for i in range(config.num_layers)]
        self.attn_norm = [w.get(f"model.layers.{i}.input_layernorm.weight") for i in range(config.num_layers)]
        self.ffn_norm = [w.get(f"model.layers.{i}.post_attention_layernorm.weight") for i in range(config.num_layers)]
        self.norm = w.get("model.norm.weight")
        self.inv_freq = rope_inv_freq(config.rope, config.head_dim, device)  # [D/2]

    @staticmethod
    def layer_prefix(i: int) -> str:
        return f"model.layers.{i}."

    def set_attention(self, i: int, w: DenseWeights | None) -> None:
        """Install (or, with None, drop) layer i's attention projections."""
        self.attn[i] = None if w is None else _attention_weights(w, self.layer_prefix(i))

    def forward(self, input_ids: torch.Tensor, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor,
                ffn: FFNProvider) -> torch.Tensor:
        """input_ids, positions: [B, T]; slots: [B] -> logits [B, T, V]."""
        c = self.config
        x = F.embedding(input_ids, self.embed)  # [B, T, d]
        rope = rope_cos_sin(self.inv_freq, positions)
        for i in range(c.num_layers):
            h = rms_norm(x, self.attn_norm[i], c.norm_eps)
            x = x + attention(h, self.attn[i], i, cache, slots, positions, c.num_heads, c.num_kv_heads,
                              c.head_dim, rope, c.sliding_window)
            h = rms_norm(x, self.ffn_norm[i], c.norm_eps)  # FFN input handed to the provider
            x = x + swiglu_ffn(h, ffn(i, h))
        x = rms_norm(x, self.norm, c.norm_eps)
        return F.linear(x, self.lm_head)
