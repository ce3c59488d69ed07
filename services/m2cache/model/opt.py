"""OPT: learned positions (offset 2), LayerNorm before (125m, 1.3b, ...) or
after (350m) each sub-block, optional project_in/out, ReLU FFN computed by the
FFN provider; fc2's bias stays dense and is added here."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from m2cache.model.config import ModelConfig
from m2cache.model.kv_cache import KVCache, Step
from m2cache.model.layers import AttentionWeights, Heads, attention, layer_norm
from m2cache.model.weights import DenseWeights

POSITION_OFFSET = 2  # OPT's learned positions are stored shifted by 2


def _norm(w: DenseWeights, prefix: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias), both None when layer_norm_elementwise_affine is False."""
    return w.maybe(prefix + ".weight"), w.maybe(prefix + ".bias")


class OPTModel:
    """Dense weights by HF name (model.decoder.layers.{i}.self_attn.q_proj.weight, ...)."""

    attn_out = "out_proj"

    def __init__(self, config: ModelConfig, w: DenseWeights, device, streamed: frozenset[int] = frozenset()):
        self.config = config
        self.heads = Heads(config.num_heads, config.num_kv_heads, config.head_dim)
        d = "model.decoder."
        self.embed, self.lm_head = w.embedding_and_head(d + "embed_tokens.weight", config.tie_word_embeddings)
        self.positions = w.get(d + "embed_positions.weight")  # [max_pos + 2, d]
        self.project_in = w.maybe(d + "project_in.weight")  # [d, d_proj] or None
        self.project_out = w.maybe(d + "project_out.weight")  # [d_proj, d] or None
        layers = [self.layer_prefix(i) for i in range(config.num_layers)]
        # streamed layers' attention is pulled per step from the caller's source (None here)
        self.attn: list[AttentionWeights | None] = [
            None if i in streamed else w.attention(p, self.attn_out) for i, p in enumerate(layers)]
        self.attn_norm = [_norm(w, p + "self_attn_layer_norm") for p in layers]
        self.ffn_norm = [_norm(w, p + "final_layer_norm") for p in layers]
        self.fc2_bias = [w.maybe(p + "fc2.bias") for p in layers]  # [d] or None
        self.final_norm = _norm(w, d + "final_layer_norm") if config.do_layer_norm_before else None

    @staticmethod
    def layer_prefix(i: int) -> str:
        return f"model.decoder.layers.{i}."

    def embed_tokens(self, input_ids: torch.Tensor, step: Step) -> tuple[torch.Tensor, None]:
        x = F.embedding(input_ids, self.embed)  # [B, T, d_proj]
        if self.project_in is not None:
            x = F.linear(x, self.project_in)  # [B, T, d]
        return x + F.embedding(step.positions + POSITION_OFFSET, self.positions), None

    def block_input(self, i: int, x: torch.Tensor, w: AttentionWeights, kv: KVCache, step: Step,
                    rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's attention block -> (x + attention, the FFN's input)."""
        pre, eps = self.config.do_layer_norm_before, self.config.norm_eps
        h = layer_norm(x, *self.attn_norm[i], eps) if pre else x
        x = x + attention(h, w, i, kv, step, self.heads, None)
        if not pre:  # 350m: norms after the residual adds, the FFN takes x itself
            x = layer_norm(x, *self.attn_norm[i], eps)
            return x, x
        return x, layer_norm(x, *self.ffn_norm[i], eps)

    def ffn_output(self, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + (y if self.fc2_bias[i] is None else y + self.fc2_bias[i])
        return x if self.config.do_layer_norm_before else layer_norm(x, *self.ffn_norm[i], self.config.norm_eps)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            x = layer_norm(x, *self.final_norm, self.config.norm_eps)
        if self.project_out is not None:
            x = F.linear(x, self.project_out)  # [B, T, d_proj]
        return F.linear(x, self.lm_head)
