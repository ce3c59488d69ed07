"""A model's predictors: one scorer per layer (any kind, see kinds/), plus
optional look-ahead scorers that predict layer l+1's neurons from layer l's
FFN input (for the worker's prefetch).

Named tensors (the store keys and the GetPredictor RPC use them):
``layer.{i}.{name}`` for layer i's scorer and ``ahead.{i}.{name}`` for the
scorer of layer i fed layer i-1's FFN input; ``name`` is the kind's own tensor
name, which identifies the kind (kinds/__init__.py). Old stores hold
``layer.{i}.a|b|bias`` (kind ``lowrank``) and load unchanged.

Cost: ``num_bytes()`` is what the predictor keeps resident (count it inside
the fast-memory budget), ``flops_per_token()`` what it computes per token,
both over all layers; ``cost()`` gives them per layer next to the layer's FFN.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from m2cache.errors import InvalidArgument
from m2cache.predictors.kinds import LayerPredictor, kind_of


@dataclass(slots=True)
class Predictor:
    """All layers' scorers of one model, with the store version they came from."""

    layers: list[LayerPredictor]
    version: int = 0
    meta: dict = field(default_factory=dict)  # kind, training provenance (loss, tokens, text source)
    ahead: dict[int, LayerPredictor] = field(default_factory=dict)  # layer i (>= 1) -> scorer fed layer i-1's input

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.layers[0].d_model

    @property
    def d_ffn(self) -> int:
        return self.layers[0].d_ffn

    @property
    def kinds(self) -> list[str]:
        return [_kind_name(p) for p in self.layers]

    def ranks(self) -> list[int]:
        return [p.rank for p in self.layers]

    def _check(self, layer: int, x: torch.Tensor) -> None:
        if not 0 <= layer < self.num_layers:
            raise InvalidArgument(f"layer {layer} out of range: the predictor has {self.num_layers} layers")
        if x.shape[-1] != self.d_model:
            raise InvalidArgument(f"hidden states have width {x.shape[-1]}, the model's d_model is {self.d_model}")

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] (layer's FFN input) -> [..., d_ffn] importance scores."""
        self._check(layer, x)
        p = self.layers[layer]
        return p.scores(x.reshape(-1, x.shape[-1]).float().to(_device(p))).reshape(*x.shape[:-1], -1)

    def scores_ahead(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Scores of layer ``layer + 1``'s neurons from layer ``layer``'s FFN input
        x [..., d_model] (for prefetching the next layer while this one computes).
        Uses the trained look-ahead scorer when the predictor has one, else layer
        l+1's own scorer applied to x (free, less accurate)."""
        self._check(layer, x)
        if layer + 1 >= self.num_layers:
            raise InvalidArgument(f"layer {layer} is the last: there is no layer ahead to predict")
        p = self.ahead.get(layer + 1, self.layers[layer + 1])
        return p.scores(x.reshape(-1, x.shape[-1]).float().to(_device(p))).reshape(*x.shape[:-1], -1)

    def num_bytes(self, ahead: bool = True) -> int:
        """Resident bytes of every layer's scorer (and the look-ahead ones)."""
        return sum(p.num_bytes() for p in self.layers) + (sum(p.num_bytes() for p in self.ahead.values()) if ahead else 0)

    def flops_per_token(self, ahead: bool = True) -> int:
        """FLOPs to score one token at every layer (and ahead, if used)."""
        total = sum(p.flops_per_token() for p in self.layers)
        return total + (sum(p.flops_per_token() for p in self.ahead.values()) if ahead else 0)

    def cost(self, ffn_bytes: int, ffn_flops: int) -> dict:
        """Per-layer mean cost as fractions of one layer's dense FFN (bytes at FULL, FLOPs)."""
        n = self.num_layers
        out = {"bytes": self.num_bytes(False) / n, "flops": self.flops_per_token(False) / n}
        out["bytes_frac"], out["flops_frac"] = out["bytes"] / ffn_bytes, out["flops"] / ffn_flops
        if self.ahead:
            m = len(self.ahead)
            ab = sum(p.num_bytes() for p in self.ahead.values()) / m
            af = sum(p.flops_per_token() for p in self.ahead.values()) / m
            out.update(ahead_bytes=ab, ahead_flops=af, ahead_bytes_frac=ab / ffn_bytes, ahead_flops_frac=af / ffn_flops)
        return out

    def to(self, device: str | torch.device) -> "Predictor":
        return Predictor([p.to(device) for p in self.layers], self.version, dict(self.meta),
                         {i: p.to(device) for i, p in self.ahead.items()})

    # ---- named tensors (store + wire form) -------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, items in (("layer", enumerate(self.layers)), ("ahead", sorted(self.ahead.items()))):
            for i, p in items:
                for name, t in p.tensors().items():
                    out[f"{prefix}.{i}.{name}"] = t
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], version: int = 0, meta: dict | None = None) -> "Predictor":
        groups: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for full, t in tensors.items():
            parts = full.split(".", 2)
            if len(parts) != 3 or parts[0] not in ("layer", "ahead") or not parts[1].isdigit():
                raise InvalidArgument(f"bad predictor tensor name {full!r}: expected layer.<i>.<name> or ahead.<i>.<name>")
            groups.setdefault((parts[0], int(parts[1])), {})[parts[2]] = t
        num_layers = 1 + max((i for (prefix, i) in groups if prefix == "layer"), default=-1)
        if num_layers == 0:
            raise InvalidArgument("predictor has no layer tensors")
        layers = []
        for i in range(num_layers):
            if ("layer", i) not in groups:
                raise InvalidArgument(f"predictor tensors lack layer {i}")
            layers.append(_build(groups[("layer", i)]))
        ahead = {i: _build(g) for (prefix, i), g in groups.items() if prefix == "ahead"}
        if any(not 1 <= i < num_layers for i in ahead):
            raise InvalidArgument(f"look-ahead scorers for layers {sorted(ahead)} outside 1..{num_layers - 1}")
        return cls(layers, version, meta or {}, ahead)


def _build(group: dict[str, torch.Tensor]) -> LayerPredictor:
    return kind_of(set(group)).from_tensors(group)


def _kind_name(p: LayerPredictor) -> str:
    return getattr(p, "kind_name", p.kind)


def _device(p: LayerPredictor) -> torch.device:
    return next(iter(p.tensors().values())).device


def parse_ranks(spec: str | int | None, num_layers: int, d_model: int, d_ffn: int) -> list[int]:
    """Rank per layer from "R" (all layers) or "R0,R1,..." (one per layer).

    Default (kind ``lowrank``): d_model // 4 clamped to [8, 256]."""
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
