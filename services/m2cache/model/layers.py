"""Layer math shared by the model families: norms, rotary embedding and
attention over the slotted KV cache. Pure tensor functions, no I/O."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from m2cache.model.config import RopeConfig
from m2cache.model.kv_cache import KVCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., d], weight: [d]. Normalised in float32, as transformers does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


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


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, T] -> cos, sin: [B, 1, T, head_dim] (broadcast over heads)."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotate-half convention (Hugging Face layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ---- attention ------------------------------------------------------------------
@dataclass(slots=True)
class AttentionWeights:
    """One layer's projections, Hugging Face [out, in] layout; biases may be None."""

    wq: torch.Tensor  # [H*D, d]
    wk: torch.Tensor  # [Hkv*D, d]
    wv: torch.Tensor  # [Hkv*D, d]
    wo: torch.Tensor  # [d, H*D]
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None


def causal_mask(positions: torch.Tensor, key_len: int, window: int | None) -> torch.Tensor:
    """positions: [B, T] absolute query positions -> bool [B, 1, T, key_len].

    Key j is visible to a query at position p iff j <= p (and j > p - window).
    This also hides cache rows past a short sequence's length in a mixed batch."""
    keys = torch.arange(key_len, device=positions.device)
    visible = keys[None, None, :] <= positions[:, :, None]
    if window is not None:
        visible &= keys[None, None, :] > positions[:, :, None] - window
    return visible.unsqueeze(1)


def attention(
    x: torch.Tensor, w: AttentionWeights, layer: int, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int, rope: tuple[torch.Tensor, torch.Tensor] | None,
    window: int | None = None,
) -> torch.Tensor:
    """x: [B, T, d] (normed), slots: [B], positions: [B, T] -> [B, T, d].

    Writes this step's keys/values into the cache rows ``slots`` at ``positions``
    and attends over each row's whole history."""
    assert w is not None, f"attention weights of layer {layer} are not loaded (streamed layer)"
    B, T, _ = x.shape
    q = F.linear(x, w.wq, w.bq).view(B, T, num_heads, head_dim).transpose(1, 2)  # [B, H, T, D]
    k = F.linear(x, w.wk, w.bk).view(B, T, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, T, D]
    v = F.linear(x, w.wv, w.bv).view(B, T, num_kv_heads, head_dim).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    cache.write(layer, slots, positions, k, v)
    key_len = int(positions.max()) + 1
    keys, values = cache.read(layer, slots, key_len)  # [B, Hkv, L, D]
    rep = num_heads // num_kv_heads
    if rep > 1:  # GQA: query head h reads kv head h // rep
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    mask = causal_mask(positions, key_len, window)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, H, T, D]
    out = out.transpose(1, 2).reshape(B, T, num_heads * head_dim)
    return F.linear(out, w.wo, w.bo)
