"""How well a ranking finds the truly active neurons: top-k recall per layer."""
from __future__ import annotations

import torch

from m2cache.predictors.collect import neuron_magnitudes


def topk_recall(scores: torch.Tensor, magnitudes: torch.Tensor, frac: float) -> float:
    """Mean over rows of |top-k(scores) & top-k(magnitudes)| / k, k = round(frac * F).

    scores, magnitudes: [N, F]. 1.0 means the ranking picks exactly the k
    largest activations of every token; a random ranking scores about frac."""
    k = max(1, round(frac * scores.shape[-1]))
    pred = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)
    true = torch.zeros_like(pred).scatter_(-1, magnitudes.topk(k, dim=-1).indices, True)
    return ((pred & true).sum(dim=-1).float() / k).mean().item()


def layer_recalls(inputs: list[torch.Tensor], full_weights, ffn_kind: str, rankers: dict,
                  fracs: tuple[float, ...] = (0.1, 0.25, 0.5), chunk: int = 4096) -> dict:
    """{ranker name: [[recall at frac for frac in fracs] for each layer]}.

    rankers: name -> fn(layer, x [n, d], magnitudes [n, F]) -> scores [n, F]
    (an oracle may look at the magnitudes; real rankers must not)."""
    out = {name: [] for name in rankers}
    for layer, x in enumerate(inputs):
        vectors, bias = full_weights(layer)
        sums = {name: [0.0] * len(fracs) for name in rankers}
        for lo in range(0, x.shape[0], chunk):
            xb = x[lo : lo + chunk]
            mags = neuron_magnitudes(vectors, bias, xb, ffn_kind).cpu()
            for name, fn in rankers.items():
                scores = fn(layer, xb, mags).cpu()
                for i, f in enumerate(fracs):
                    sums[name][i] += topk_recall(scores, mags, f) * xb.shape[0]
        for name in rankers:
            out[name].append([s / x.shape[0] for s in sums[name]])
    return out


def ahead_recalls(inputs: list[torch.Tensor], full_weights, ffn_kind: str, predictor,
                  fracs: tuple[float, ...] = (0.1, 0.25, 0.5), chunk: int = 4096) -> list[list[float]]:
    """Look-ahead recall: for each layer l >= 1, [recall at frac for frac in fracs]
    of ``predictor.scores_ahead(l - 1, x_{l-1})`` against layer l's true magnitudes."""
    out = []
    for layer in range(1, len(inputs)):
        vectors, bias = full_weights(layer)
        sums = [0.0] * len(fracs)
        for lo in range(0, inputs[layer].shape[0], chunk):
            mags = neuron_magnitudes(vectors, bias, inputs[layer][lo : lo + chunk], ffn_kind).cpu()
            scores = predictor.scores_ahead(layer - 1, inputs[layer - 1][lo : lo + chunk]).cpu()
            for i, f in enumerate(fracs):
                sums[i] += topk_recall(scores, mags, f) * mags.shape[0]
        out.append([v / inputs[layer].shape[0] for v in sums])
    return out


def standard_rankers(predictor, seed: int = 0) -> dict:
    """Trained predictor, oracle (true magnitudes) and random scores."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "predictor": lambda layer, x, mags: predictor.scores(layer, x),
        "oracle": lambda layer, x, mags: mags,
        "random": lambda layer, x, mags: torch.rand(mags.shape, generator=gen),
    }
