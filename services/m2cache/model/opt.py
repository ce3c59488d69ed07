"""OPT: learned positions (offset 2), LayerNorm before (125m, 1.3b, ...) or
after (350m) each sub-block, optional project_in/out, ReLU FFN whose fc1 rows
and fc2 columns come from a provider; fc2's bias stays dense."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from m2cache.model.config import ModelConfig
from m2cache.model.ffn import FFNProvider, relu_ffn
from m2cache.model.kv_cache import KVCache
from m2cache.model.layers import AttentionWeights, attention, layer_norm
from m2cache.model.weights import DenseWeights

POSITION_OFFSET = 2  # OPT's learned positions are stored shifted by 2


def _attention_weights(w: DenseWeights, prefix: str) -> AttentionWeights:
    return w.attention(prefix, "out_proj")


def _norm(w: DenseWeights, prefix: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias), both None when layer_norm_elementwise_affine is False."""
    return w.maybe(prefix + ".weight"), w.maybe(prefix + ".bias")


class OPTModel:
    """Dense weights by HF name (model.decoder.layers.{i}.self_attn.q_proj.weight, ...)."""

    def __init__(self, config: ModelConfig, w: DenseWeights, device, streamed: frozenset[int] = frozenset()):
        self.config = config
        d = "model.decoder."
        self.embed, self.lm_head = w.embedding_and_head(d + "embed_tokens.weight", config.tie_word_embeddings)
        self.positions = w.get(d + "embed_positions.weight")  # [max_pos + 2, d]
        self.project_in = w.maybe(d + "project_in.weight")  # [d, d_proj] or None
        self.project_out = w.maybe(d + "project_out.weight")  # [d_proj, d] or None
        layers = [self.layer_prefix(i) for i in range(config.num_layers)]
        # streamed layers' attention arrives per step via set_attention (None until then)
        self.attn = [None if i in streamed else _attention_weights(w, p) for i, p in enumerate(layers)]
        self.attn_norm = [_norm(w, p + "self_attn_layer_norm") for p in layers]
        self.ffn_norm = [_norm(w, p + "final_layer_norm") for p in layers]
        self.fc2_bias = [w.maybe(p + "fc2.bias") for p in layers]  # [d] or None
        self.final_norm = _norm(w, d + "final_layer_norm") if config.do_layer_norm_before else None

    @staticmethod
    def layer_prefix(i: int) -> str:
        return f"model.decoder.layers.{i}."

    def set_attention(self, i: int, w: DenseWeights | None) -> None:
        """Install (or, with None, drop) layer i's attention projections."""
        self.attn[i] = None if w is None else _attention_weights(w, self.layer_prefix(i))

    def _ffn(self, i: int, x: torch.Tensor, ffn: FFNProvider) -> torch.Tensor:
        """x: [B, T, d] FFN input -> [B, T, d]."""
        y = relu_ffn(x, ffn(i, x))
        return y if self.fc2_bias[i] is None else y + self.fc2_bias[i]

    def _layer(self, i: int, x: torch.Tensor, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor,
               ffn: FFNProvider) -> torch.Tensor:
        c, pre, eps = self.config, self.config.do_layer_norm_before, self.config.norm_eps
        h = layer_norm(x, *self.attn_norm[i], eps) if pre else x
        x = x + attention(h, self.attn[i], i, cache, slots, positions, c.num_heads, c.num_kv_heads, c.head_dim, None)
        if not pre:  # 350m: norm after the residual add; the FFN input is that normed state
            x = layer_norm(x, *self.attn_norm[i], eps)
        h = layer_norm(x, *self.ffn_norm[i], eps) if pre else x
        x = x + self._ffn(i, h, ffn)
        return x if pre else layer_norm(x, *self.ffn_norm[i], eps)

    def forward(self, input_ids: torch.Tensor, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor,
                ffn: FFNProvider) -> torch.Tensor:
        """input_ids, positions: [B, T]; slots: [B] -> logits [B, T, V]."""
        x = F.embedding(input_ids, self.embed)  # [B, T, d_proj]
        if self.project_in is not None:
            x = F.linear(x, self.project_in)  # [B, T, d]
        x = x + F.embedding(positions + POSITION_OFFSET, self.positions)
        for i in range(self.config.num_layers):
            x = self._layer(i, x, cache, slots, positions, ffn)
        if self.final_norm is not None:
            x = layer_norm(x, *self.final_norm, self.config.norm_eps)
        if self.project_out is not None:
            x = F.linear(x, self.project_out)  # [B, T, d_proj]
        return F.linear(x, self.lm_head)
