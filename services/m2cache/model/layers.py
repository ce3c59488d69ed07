"""Layer math shared by the model families: norms, rotary embedding and
attention over the slotted KV cache. Pure tensor functions, no I/O."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from m2cache.model.config import RopeConfig
from m2cache.model.kv_cache import KVCache, Step


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., d], weight: [d]. Normalised in float32, as transformers does."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [..., d]; weight/bias [d] or None (layer_norm_elementwise_affine=False)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# ---- rotary embedding ---------------------------------------------------------
def rope_inv_freq(rope: RopeConfig, head_dim: int, device) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with llama3 scaling when configured."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, a smooth ramp between."""
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RopeTable:
    """cos/sin of every position up to the longest seen (grown on demand, float32,
    computed exactly as transformers does: positions * inv_freq, then cos/sin)."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq  # [D/2]
        self.cos = self.sin = torch.empty(0, 2 * inv_freq.numel(), device=inv_freq.device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, D] in ``dtype`` (broadcast over heads)."""
        need = int(positions.max()) + 1
        if need > self.cos.shape[0]:
            size = max(need, 2 * self.cos.shape[0], 256)
            freqs = torch.arange(size, device=self.inv_freq.device).float()[:, None] * self.inv_freq  # [P, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos[positions].unsqueeze(2).to(dtype), self.sin[positions].unsqueeze(2).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; rotate-half convention (Hugging Face layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---- attention ------------------------------------------------------------------
def attention_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """Attention (rope, scores, the KV cache) runs in float32 on CPU, where half-precision
    attention kernels are several times slower than float32 ones; in the model's dtype elsewhere."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


@dataclass(slots=True)
class AttentionWeights:
    """One layer's projections, Hugging Face [out, in] layout, q/k/v fused."""

    wqkv: torch.Tensor  # [(H + 2 Hkv) * D, d]
    wo: torch.Tensor  # [d, H*D]
    bqkv: torch.Tensor | None = None
    bo: torch.Tensor | None = None

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.wqkv, self.wo, self.bqkv, self.bo) if t is not None)


@dataclass(frozen=True, slots=True)
class Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def attention(x: torch.Tensor, w: AttentionWeights, layer: int, kv: KVCache, step: Step, heads: Heads,
              rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """x: [B, T, d] (normed) -> [B, T, d]. Writes this step's keys/values into the
    cache and attends over each row's history (GQA without repeating k/v), in the
    cache's dtype (float32 on CPU: half-precision attention is several times slower there)."""
    B, T, _ = x.shape
    H, Hkv, D = heads.num_heads, heads.num_kv_heads, heads.head_dim
    qkv = F.linear(x, w.wqkv, w.bqkv).to(kv.dtype)  # [B, T, (H + 2 Hkv) D], in the cache's dtype
    qk, v = qkv.split(((H + Hkv) * D, Hkv * D), dim=-1)
    qk = qk.view(B, T, H + Hkv, D)
    if rope is not None:  # q and k rotated together
        qk = apply_rope(qk, *rope)
    q, k = qk.split((H, Hkv), dim=2)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D], [B, Hkv, T, D]
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    kv.write(layer, step, k, v)
    keys, values = kv.read(layer, step)  # [B, Hkv, L, D]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, is_causal=step.is_causal,
                                         enable_gqa=H != Hkv)  # [B, H, T, D]
    return F.linear(out.transpose(1, 2).reshape(B, T, H * D).to(x.dtype), w.wo, w.bo)
