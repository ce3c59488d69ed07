"""Decode-path quality: negative log-likelihood and predictive entropy measured
one token at a time (batch 1), as the worker decodes.

A sparse choice is made per forward call, so a batched prefill would share one
neuron set across a whole chunk; stepping token by token gives every token its
own choice, which is what per-token sparsity means. For the dense model this
equals model.eval.perplexity up to float rounding (checked in the tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class StepScore:
    nll: float  # summed over predicted tokens, nats
    entropy: float  # summed predictive entropy, nats
    count: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.count)

    @property
    def mean_entropy(self) -> float:
        return self.entropy / self.count


def stepwise_score(model, sequences: list[torch.Tensor], provider) -> StepScore:
    """Feed each sequence one token per forward; score tokens 1..T-1 of each."""
    nll = ent = 0.0
    count = 0
    for seq in sequences:
        cache = model.new_cache(1, seq.numel())
        for t in range(seq.numel() - 1):
            logits = model.forward(seq[t : t + 1].reshape(1, 1), cache, [0], provider)[0, -1]  # [V]
            logp = F.log_softmax(logits.float(), dim=-1)
            nll -= logp[seq[t + 1]].item()
            ent -= (logp.exp() * logp).sum().item()
            count += 1
    return StepScore(nll, ent, count)
