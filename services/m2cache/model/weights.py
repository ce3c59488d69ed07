"""Dense tensors by Hugging Face name, moved to the compute device and dtype."""
from __future__ import annotations

import torch

from m2cache.codec.format import DTYPES
from m2cache.errors import CheckpointError
from m2cache.model.layers import AttentionWeights


def compute_dtype(checkpoint_dtype: str) -> torch.dtype:
    """The dtype the model computes in: the checkpoint's own (on the CPUs measured, fp16
    linear layers are the fastest batch-1 decode, ahead of bf16 and fp32; docs/BENCHMARKS.md)."""
    return DTYPES[checkpoint_dtype]


class DenseWeights:
    """Lookup of the dense (non-FFN) tensors; missing required names raise CheckpointError."""

    def __init__(self, dense: dict[str, torch.Tensor], device, dtype: torch.dtype):
        self.dtype = dtype
        self._tensors = {name: t.to(device=device, dtype=dtype) for name, t in dense.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> torch.Tensor:
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"dense tensor {name!r} is missing")
        return t

    def embedding_and_head(self, embed_name: str, tied: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embedding, lm_head) [V, d]. Tied checkpoints may save either
        name only (tinystories-656k keeps just lm_head.weight)."""
        embed, head = self.maybe(embed_name), self.maybe("lm_head.weight")
        if tied or head is None:
            embed = head if embed is None else embed
            head = embed
        if embed is None:
            raise CheckpointError(f"dense tensor {embed_name!r} is missing")
        return embed, head

    def maybe(self, name: str) -> torch.Tensor | None:
        return self._tensors.get(name)

    def attention(self, layer_prefix: str, out_proj: str) -> AttentionWeights:
        """A layer's projections with q/k/v fused into one matrix (``out_proj``: "o_proj"
        for the Llama family, "out_proj" for OPT); biases None where the checkpoint has none."""
        fused = attention_weights(self._tensors, layer_prefix, out_proj)
        for x in "qkv":  # the fused copy replaces them: never hold both
            for kind in ("weight", "bias"):
                self._tensors.pop(f"{layer_prefix}self_attn.{x}_proj.{kind}", None)
        return fused


def attention_weights(tensors: dict[str, torch.Tensor], layer_prefix: str, out_proj: str) -> AttentionWeights:
    """Fuse q/k/v (HF names under ``layer_prefix + "self_attn."``) of already-converted tensors."""
    p = layer_prefix + "self_attn."

    def get(name: str) -> torch.Tensor:
        if p + name not in tensors:
            raise CheckpointError(f"dense tensor {p + name!r} is missing")
        return tensors[p + name]

    weights = [get(f"{x}_proj.weight") for x in "qkv"]
    biases = [tensors.get(p + f"{x}_proj.bias") for x in "qkv"]
    bqkv = None
    if any(b is not None for b in biases):  # a projection without a bias gets zeros
        bqkv = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])
    wqkv = torch.cat(weights)
    return AttentionWeights(wqkv=wqkv, wo=get(out_proj + ".weight"), bqkv=bqkv, bo=tensors.get(p + out_proj + ".bias"))
