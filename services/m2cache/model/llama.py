"""Llama family (llama, mistral, qwen2): pre-RMSNorm blocks, RoPE, GQA
attention, SwiGLU FFN computed by the FFN provider the model is handed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from m2cache.model.config import ModelConfig
from m2cache.model import kernels
from m2cache.model.kv_cache import KVCache, Step
from m2cache.model.layers import (AttentionWeights, Heads, RopeTable, attention, attention_dtype, rms_norm,
                                  rope_inv_freq)
from m2cache.model.weights import DenseWeights


class LlamaModel:
    """Dense weights by HF name (model.layers.{i}.self_attn.q_proj.weight, ...)."""

    attn_out = "o_proj"

    def __init__(self, config: ModelConfig, w: DenseWeights, device, streamed: frozenset[int] = frozenset()):
        self.config = config
        self.heads = Heads(config.num_heads, config.num_kv_heads, config.head_dim)
        self.embed, self.lm_head = w.embedding_and_head("model.embed_tokens.weight", config.tie_word_embeddings)
        # streamed layers' attention is pulled per step from the caller's source (None here)
        self.attn: list[AttentionWeights | None] = [
            None if i in streamed else w.attention(self.layer_prefix(i), self.attn_out) for i in range(config.num_layers)]
        self.attn_norm = [w.get(f"model.layers.{i}.input_layernorm.weight") for i in range(config.num_layers)]
        self.ffn_norm = [w.get(f"model.layers.{i}.post_attention_layernorm.weight") for i in range(config.num_layers)]
        self.norm = w.get("model.norm.weight")
        self.rope = RopeTable(rope_inv_freq(config.rope, config.head_dim, device))
        self.attention_dtype = attention_dtype(device, w.dtype)
        self._blocks: dict[int, tuple[AttentionWeights, kernels.AttentionBlock | None]] = {}  # layer -> (weights, C block)

    @staticmethod
    def layer_prefix(i: int) -> str:
        return f"model.layers.{i}."

    def embed_tokens(self, input_ids: torch.Tensor, step: Step) -> tuple[torch.Tensor, tuple]:
        """input_ids [B, T] -> (x [B, T, d], rope cos/sin for the step)."""
        x = F.embedding(input_ids, self.embed)
        return x, self.rope.lookup(step.positions, self.attention_dtype)

    def block_input(self, i: int, x: torch.Tensor, w: AttentionWeights, kv: KVCache, step: Step,
                    rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's attention block -> (x + attention, the FFN's input). A lone decode
        token on CPU runs it as one C call (kernels/decode.c, the same arithmetic)."""
        if step.slot is not None and step.mask is None and x.shape[1] == 1 and x.device.type == "cpu":
            fused = self._decode_block(i, w)
            out = None if fused is None else fused(x, self.heads, kv.row(i, step.slot), step.start, rope)
            if out is not None:
                return out
        eps = self.config.norm_eps
        x = x + attention(rms_norm(x, self.attn_norm[i], eps), w, i, kv, step, self.heads, rope)
        return x, rms_norm(x, self.ffn_norm[i], eps)

    def _decode_block(self, i: int, w: AttentionWeights) -> kernels.AttentionBlock | None:
        cached = self._blocks.get(i)
        if cached is None or cached[0] is not w:  # streamed layers hand in new weights each step
            block = kernels.AttentionBlock.build(w.wqkv, w.bqkv, w.wo, w.bo, self.attn_norm[i],
                                                 self.ffn_norm[i], self.config.norm_eps)
            cached = self._blocks[i] = (w, block)
        return cached[1]

    def ffn_output(self, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = kernels.head(x, self.norm, self.config.norm_eps, self.lm_head)  # a lone decode token (C)
        return logits if logits is not None else F.linear(rms_norm(x, self.norm, self.config.norm_eps), self.lm_head)
