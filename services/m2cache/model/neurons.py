"""Hugging Face FFN tensors <-> neuron vectors (the bundling in core/format.py):
SwiGLU neuron i = [gate[i], up[i], down[:, i]]; ReLU neuron i = [fc1[i], fc2[:, i]] + fc1.bias[i]."""
from __future__ import annotations

import torch

from m2cache.model.config import ModelConfig


def ffn_names(config: ModelConfig, layer: int) -> dict[str, str]:
    """Role -> HF tensor name of one layer's FFN (fc2 bias excluded: it stays dense)."""
    if config.family == "llama":
        p = f"model.layers.{layer}.mlp."
        return {"gate": p + "gate_proj.weight", "up": p + "up_proj.weight", "down": p + "down_proj.weight"}
    p = f"model.decoder.layers.{layer}."
    return {"fc1": p + "fc1.weight", "fc1_bias": p + "fc1.bias", "fc2": p + "fc2.weight"}


def neuron_vectors(config: ModelConfig, state_dict: dict[str, torch.Tensor],
                   layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's neurons from an HF state dict -> vectors [F, nvec, d] (+ bias [F] for ReLU)."""
    n = ffn_names(config, layer)
    if config.family == "llama":
        rows = (state_dict[n["gate"]], state_dict[n["up"]], state_dict[n["down"]].T)
        return torch.stack(rows, dim=1), None
    fc1 = state_dict[n["fc1"]]
    bias = state_dict.get(n["fc1_bias"])
    bias = torch.zeros(fc1.shape[0], dtype=torch.float32) if bias is None else bias.float()
    return torch.stack((fc1, state_dict[n["fc2"]].T), dim=1), bias


def dense_tensors(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor that is not an FFN neuron part (OPT's fc2 bias is kept)."""
    ffn = {name for i in range(config.num_layers) for name in ffn_names(config, i).values()}
    return {name: t for name, t in state_dict.items() if name not in ffn}
