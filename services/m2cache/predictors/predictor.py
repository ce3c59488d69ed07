"""Low-rank activation predictors (Deja Vu / LLM-in-a-flash style), one per layer.

A layer's predictor maps the FFN input x [.., d_model] to one importance score
per neuron: ``scores = (x @ a) @ b + bias`` with a [d, r], b [r, d_ffn],
bias [d_ffn]. Scores are only ever *ranked* (see bands.py), so their scale is
free; training fits them to the standardised log-magnitude of each neuron's
true activation (train.py). The rank r may differ per layer.

Tensor names ("layer.{i}.a", "layer.{i}.b", "layer.{i}.bias") are the ones the
store keys and the GetPredictor RPC use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from m2cache.errors import InvalidArgument


@dataclass(slots=True)
class LayerPredictor:
    a: torch.Tensor  # [d_model, r]
    b: torch.Tensor  # [r, d_ffn]
    bias: torch.Tensor  # [d_ffn]

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> scores [..., d_ffn] (float32, on the predictor's device)."""
        x = x.to(device=self.a.device, dtype=self.a.dtype)
        return (x @ self.a) @ self.b + self.bias


@dataclass(slots=True)
class Predictor:
    """All layers' predictors of one model, with the store version they came from."""

    layers: list[LayerPredictor]
    version: int = 0
    meta: dict = field(default_factory=dict)  # training provenance (loss, tokens, text source)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.layers[0].a.shape[0]

    @property
    def d_ffn(self) -> int:
        return self.layers[0].b.shape[1]

    def ranks(self) -> list[int]:
        return [p.rank for p in self.layers]

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> [..., d_ffn]."""
        if not 0 <= layer < self.num_layers:
            raise InvalidArgument(f"layer {layer} out of range: the predictor has {self.num_layers} layers")
        if x.shape[-1] != self.d_model:
            raise InvalidArgument(f"hidden states have width {x.shape[-1]}, the model's d_model is {self.d_model}")
        return self.layers[layer].scores(x)

    def to(self, device: str | torch.device) -> "Predictor":
        layers = [LayerPredictor(p.a.to(device), p.b.to(device), p.bias.to(device)) for p in self.layers]
        return Predictor(layers, self.version, dict(self.meta))

    # ---- named tensors (store + wire form) -------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, p in enumerate(self.layers):
            out[f"layer.{i}.a"], out[f"layer.{i}.b"], out[f"layer.{i}.bias"] = p.a, p.b, p.bias
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], version: int = 0, meta: dict | None = None) -> "Predictor":
        num_layers = len({name.split(".")[1] for name in tensors})
        layers = []
        for i in range(num_layers):
            try:
                a, b, bias = (tensors[f"layer.{i}.{k}"].float() for k in ("a", "b", "bias"))
            except KeyError as err:
                raise InvalidArgument(f"predictor tensors lack {err.args[0]!r}") from None
            if a.shape[1] != b.shape[0] or b.shape[1] != bias.shape[0]:
                raise InvalidArgument(f"layer {i} predictor shapes disagree: a {tuple(a.shape)}, b {tuple(b.shape)}")
            layers.append(LayerPredictor(a, b, bias))
        return cls(layers, version, meta or {})


def parse_ranks(spec: str | int | None, num_layers: int, d_model: int, d_ffn: int) -> list[int]:
    """Rank per layer from "R" (all layers) or "R0,R1,..." (one per layer).

    Default: d_model // 4 clamped to [8, 256], the ranks LLM-in-a-flash uses at
    scale (128-256) shrunk for small models."""
    if spec is None or spec == "" or spec == 0:
        return [min(max(d_model // 4, 8), 256, d_ffn)] * num_layers
    parts = [int(s) for s in str(spec).split(",")]
    if len(parts) == 1:
        parts *= num_layers
    if len(parts) != num_layers:
        raise InvalidArgument(f"--rank lists {len(parts)} ranks; the model has {num_layers} layers")
    if any(r < 1 for r in parts):
        raise InvalidArgument(f"predictor ranks must be >= 1, got {parts}")
    return parts
