"""Training the low-rank predictors on recorded FFN inputs.

Loss (why): the predictor's only job is to *rank* a layer's neurons, at several
depths at once (the FULL band is the top few percent, INT4 reaches down to
half or more of the layer). So the target is each neuron's standardised
log-magnitude within its token, t = (log(|act| + eps) - mean) / std over the
token's neurons, fitted by mean squared error:
- scale-free: tokens with large and small activations weigh the same, and only
  the order inside a token matters, as for banding;
- depth-agnostic: a BCE on "in the top k%" trains one cut-off; the bands need
  the whole order (we measured both; see docs/BENCHMARKS.md "## Ranker");
- the log compresses the heavy tail so the few huge activations do not swamp
  the order of the rest.
Targets are recomputed per minibatch from the layer's FULL weights
(collect.neuron_magnitudes), so no [N, d_ffn] table is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from m2cache.errors import InvalidArgument
from m2cache.predictors.collect import neuron_magnitudes
from m2cache.predictors.predictor import LayerPredictor, Predictor

LOG_EPS = 1e-6

# progress(stage, step, total, loss)
Progress = Callable[[str, int, int, float], None]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 4
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise InvalidArgument(f"bad training settings: epochs={self.epochs} batch={self.batch_size} lr={self.lr}")


def ranking_targets(magnitudes: torch.Tensor) -> torch.Tensor:
    """[N, F] |activations| -> [N, F] standardised log-magnitudes per row."""
    t = torch.log(magnitudes + LOG_EPS)
    return (t - t.mean(dim=-1, keepdim=True)) / t.std(dim=-1, keepdim=True).clamp_min(1e-6)


def _init_layer(d: int, r: int, f: int, gen: torch.Generator, device) -> list[torch.Tensor]:
    """Parameters a [d, r], b [r, f], bias [f]. b starts at zero (as in LoRA), so
    the first scores are 0 = the targets' per-row mean (loss 1), not noise."""
    a = torch.randn(d, r, generator=gen) / math.sqrt(d)
    b = torch.zeros(r, f)
    return [p.to(device).requires_grad_() for p in (a, b, torch.zeros(f))]


def train_layer(x: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor | None, ffn_kind: str, rank: int,
                config: TrainConfig, on_step: Callable[[float], None] | None = None) -> tuple[LayerPredictor, float]:
    """Fit one layer's predictor. x [N, d] FFN inputs; vectors [F, nvec, d] FULL
    weights. Returns (predictor on CPU, mean loss of the last epoch)."""
    dev = torch.device(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    x, vectors = x.to(dev), vectors.to(dev)
    bias = bias.to(dev) if bias is not None else None
    a, b, c = params = _init_layer(x.shape[1], rank, vectors.shape[0], gen, dev)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    last = float("nan")
    for _ in range(config.epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(dev)
        total = 0.0
        for lo in range(0, x.shape[0], config.batch_size):
            xb = x[order[lo : lo + config.batch_size]]  # [B, d]
            with torch.no_grad():
                target = ranking_targets(neuron_magnitudes(vectors, bias, xb, ffn_kind))  # [B, F]
            loss = torch.nn.functional.mse_loss((xb @ a) @ b + c, target)  # scores [B, F]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * xb.shape[0]
            if on_step:
                on_step(loss.item())
        last = total / x.shape[0]
    return LayerPredictor(a.detach().cpu(), b.detach().cpu(), c.detach().cpu()), last


def steps_per_layer(num_rows: int, config: TrainConfig) -> int:
    return config.epochs * math.ceil(num_rows / config.batch_size)


def train_predictor(inputs: list[torch.Tensor], full_weights: Callable[[int], tuple], ffn_kind: str,
                    ranks: list[int], config: TrainConfig, progress: Progress | None = None) -> Predictor:
    """One predictor per layer. inputs[l]: [N, d] FFN inputs of layer l;
    full_weights(l) -> (vectors [F, nvec, d], bias [F] | None)."""
    if len(ranks) != len(inputs):
        raise InvalidArgument(f"{len(ranks)} ranks for {len(inputs)} layers")
    total = sum(steps_per_layer(x.shape[0], config) for x in inputs)
    done = 0
    layers, losses = [], []

    def on_step(loss: float) -> None:
        nonlocal done
        done += 1
        if progress:
            progress("train", done, total, loss)

    for layer, x in enumerate(inputs):
        vectors, bias = full_weights(layer)
        pred, loss = train_layer(x, vectors, bias, ffn_kind, ranks[layer], config, on_step)
        layers.append(pred)
        losses.append(loss)
    meta = {"loss": "standardised-log-magnitude-mse", "final_loss": losses, "tokens": int(inputs[0].shape[0]),
            "epochs": config.epochs, "lr": config.lr, "batch_size": config.batch_size}
    return Predictor(layers, 0, meta)
