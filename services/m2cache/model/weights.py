"""Dense tensors by Hugging Face name, moved to the compute device and dtype."""
from __future__ import annotations

import torch

from m2cache.errors import CheckpointError
from m2cache.model.layers import AttentionWeights


class DenseWeights:
    """Lookup of the dense (non-FFN) tensors; missing required names raise CheckpointError."""

    def __init__(self, dense: dict[str, torch.Tensor], device, dtype: torch.dtype):
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
        """A layer's q/k/v/output projections (``out_proj``: "o_proj" for the
        Llama family, "out_proj" for OPT); biases None where the checkpoint has none."""
        p = layer_prefix + "self_attn."
        return AttentionWeights(
            wq=self.get(p + "q_proj.weight"), wk=self.get(p + "k_proj.weight"), wv=self.get(p + "v_proj.weight"),
            wo=self.get(p + out_proj + ".weight"), bq=self.maybe(p + "q_proj.bias"),
            bk=self.maybe(p + "k_proj.bias"), bv=self.maybe(p + "v_proj.bias"), bo=self.maybe(p + out_proj + ".bias"),
        )
