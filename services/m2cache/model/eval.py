"""Perplexity of the reference model under any FFN provider (full, uniform
INT8/INT4, a ranker's sparse mixed-precision choice)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from m2cache.errors import InvalidArgument
from m2cache.model.ffn import FFNProvider
from m2cache.model.model import CausalLM


def chunk_tokens(token_ids: torch.Tensor | list[int], context: int) -> list[torch.Tensor]:
    """Split a token stream into consecutive chunks of ``context`` tokens (the last may be shorter)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    return [c for c in ids.split(context) if c.numel() >= 2]


def negative_log_likelihood(model: CausalLM, token_ids: torch.Tensor | list[int], provider: FFNProvider,
                            context: int = 256, batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL in nats, number of predicted tokens). Chunks of ``context``
    tokens are scored independently; a chunk's first token is context only.
    Equal-length chunks run ``batch_size`` at a time, one cache slot each."""
    if context < 2 or context > model.config.max_position_embeddings:
        raise InvalidArgument(f"context must be in [2, {model.config.max_position_embeddings}], got {context}")
    total, count = 0.0, 0
    chunks = chunk_tokens(token_ids, context)
    for lo in range(0, len(chunks), batch_size):
        group = chunks[lo : lo + batch_size]
        for batch in _same_length(group):
            nll, n = _score(model, torch.stack(batch), provider)
            total, count = total + nll, count + n
    if count == 0:
        raise InvalidArgument("need at least 2 tokens to measure perplexity")
    return total, count


def perplexity(model: CausalLM, token_ids: torch.Tensor | list[int], provider: FFNProvider,
               context: int = 256, batch_size: int = 8) -> float:
    """exp(mean NLL) over every predicted token (see negative_log_likelihood)."""
    total, count = negative_log_likelihood(model, token_ids, provider, context, batch_size)
    return math.exp(total / count)


def _same_length(chunks: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Group chunks by length so each group stacks into one [B, T] batch."""
    groups: dict[int, list[torch.Tensor]] = {}
    for c in chunks:
        groups.setdefault(c.numel(), []).append(c)
    return list(groups.values())


def _score(model: CausalLM, batch: torch.Tensor, provider: FFNProvider) -> tuple[float, int]:
    """batch: [B, T] -> (summed NLL of tokens 1..T-1 of every row, B * (T - 1))."""
    B, T = batch.shape
    cache = model.new_cache(B, max_len=T)
    slots = [cache.allocate() for _ in range(B)]
    logits = model.forward(batch, cache, slots, provider)  # [B, T, V]
    targets = batch[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll), targets.numel()
