"""Generation in small steps (gpt-fast style): sample, prefill,
decode_one_token, generate. Greedy when temperature is 0."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from m2cache.errors import InvalidArgument
from m2cache.model.ffn import FFNProvider
from m2cache.model.kv_cache import KVCache
from m2cache.model.model import CausalLM


@dataclass(frozen=True, slots=True)
class Sampling:
    """temperature 0 = greedy; top_k / top_p None = off; seed None = nondeterministic."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:  # NaN compares False with everything
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidArgument(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits: [B, V] -> same with filtered-out entries at -inf (order as transformers: top-k, then top-p)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p  # keeps the smallest prefix reaching top_p (always >= 1 token)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] (last position) -> next token ids [B]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = _filter_top_k_top_p(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: CausalLM, input_ids: torch.Tensor, cache: KVCache, slots: torch.Tensor, ffn: FFNProvider,
            sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """input_ids: [B, T] prompts (same length) -> first new tokens [B]."""
    logits = model.forward(input_ids, cache, slots, ffn)  # [B, T, V]
    return sample(logits[:, -1], sampling, generator)


def decode_one_token(model: CausalLM, tokens: torch.Tensor, cache: KVCache, slots: torch.Tensor, ffn: FFNProvider,
                     sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """tokens: [B] last tokens of rows ``slots`` (any lengths) -> next tokens [B]."""
    logits = model.forward(tokens[:, None], cache, slots, ffn)  # [B, 1, V]
    return sample(logits[:, -1], sampling, generator)


def generate(model: CausalLM, prompt_ids: list[int], max_new_tokens: int, ffn: FFNProvider,
             sampling: Sampling = Sampling(), eos_token_ids: tuple[int, ...] | None = None,
             before_step: Callable[[], None] | None = None,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """New token ids after ``prompt_ids``: stops after ``max_new_tokens`` or at (and including) an EOS.
    ``before_step()`` runs before every forward (a cached provider's step marker);
    ``on_token(id)`` after every new token (timing)."""
    if not prompt_ids:
        raise InvalidArgument("the prompt must contain at least one token")
    if len(prompt_ids) + max_new_tokens > model.config.max_position_embeddings:
        raise InvalidArgument(f"prompt + new tokens exceed the context length {model.config.max_position_embeddings}")
    if max_new_tokens <= 0:
        return []
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    cache = model.new_cache(1, max_len=len(prompt_ids) + max_new_tokens)
    slots = torch.tensor([cache.allocate()], device=model.device)
    generator = sampling.generator(model.device)
    step = before_step or (lambda: None)
    out: list[int] = []
    step()
    token = prefill(model, torch.tensor([prompt_ids]), cache, slots, ffn, sampling, generator)
    while True:
        out.append(int(token))
        if on_token:
            on_token(out[-1])
        if len(out) >= max_new_tokens or out[-1] in eos:
            return out
        step()
        token = decode_one_token(model, token, cache, slots, ffn, sampling, generator)
