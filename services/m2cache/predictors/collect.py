"""Calibration data for the predictors: run the full-precision model over text
and keep each layer's FFN input.

Only the inputs x are stored ([N, d_model] per layer, small); a neuron's true
activation magnitude is recomputed from x and the layer's FULL weights when
needed (``neuron_magnitudes``), so [N, d_ffn] targets never sit in memory for
every layer at once.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from m2cache.codec.format import Precision
from m2cache.errors import InvalidArgument

MIN_TOKENS = 32  # fewer calibration tokens than this cannot rank d_ffn neurons meaningfully
DEFAULT_SEQ_LEN = 256


def neuron_magnitudes(vectors: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, ffn_kind: str) -> torch.Tensor:
    """|activation| of every neuron: x [N, d], vectors [F, nvec, d] -> [N, F].

    SwiGLU: |silu(x . gate_i) * (x . up_i)|; ReLU (OPT): relu(x . fc1_i + b_i).
    This is the coefficient neuron i's output vector is scaled by, so dropping
    the smallest ones perturbs the FFN output least."""
    x = x.to(vectors.device, vectors.dtype)
    if ffn_kind == "swiglu":
        return (F.silu(x @ vectors[:, 0].T) * (x @ vectors[:, 1].T)).abs()
    pre = x @ vectors[:, 0].T
    return F.relu(pre + bias if bias is not None else pre)


def tokenize(tokenizer, text: str, seq_len: int = DEFAULT_SEQ_LEN, max_tokens: int | None = None,
             bos_id: int | None = None) -> list[torch.Tensor]:
    """Calibration text -> sequences of at most ``seq_len`` token ids (LongTensor [T]),
    each starting with ``bos_id`` when given, ``max_tokens`` in all at most."""
    if not text or not text.strip():
        raise InvalidArgument("calibration text is empty")
    ids = _encode(tokenizer, text, max_tokens)
    body = seq_len - (bos_id is not None)
    if seq_len < 2 or body < 1:
        raise InvalidArgument(f"sequence length {seq_len} is too short")
    seqs = []
    for lo in range(0, len(ids), body):
        chunk = ([bos_id] if bos_id is not None else []) + ids[lo : lo + body]
        seqs.append(torch.tensor(chunk, dtype=torch.long))
        if max_tokens and sum(s.numel() for s in seqs) >= max_tokens:
            break
    if max_tokens:
        seqs = _trim(seqs, max_tokens)
    total = sum(s.numel() for s in seqs)
    if total < MIN_TOKENS:
        raise InvalidArgument(f"calibration text is too short: {total} tokens, need at least {MIN_TOKENS}")
    return seqs


def _encode(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """Token ids of ``text``; with a cap, of a prefix long enough for it (a token
    spans far fewer than 16 characters), so a large file is not tokenised whole."""
    if max_tokens and len(text) > 16 * max_tokens:
        ids = tokenizer(text[: 16 * max_tokens], add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            return ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _trim(seqs: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    out, left = [], max_tokens
    for s in seqs:
        if left <= 1:
            break
        out.append(s[:left])
        left -= out[-1].numel()
    return out


class _Recorder:
    """FFNProvider wrapper: every layer's FFN input goes to ``inputs[layer]``."""

    def __init__(self, inner, num_layers: int):
        self.inner = inner
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def __call__(self, layer: int, x: torch.Tensor):
        # x: [B, T, d] -> rows [B*T, d]
        self.inputs[layer].append(x.reshape(-1, x.shape[-1]).float().cpu())
        return self.inner(layer, x)


def collect_ffn_inputs(model, provider, sequences: list[torch.Tensor],
                       progress: Callable[[int, int], None] | None = None, show_bar: bool = False) -> list[torch.Tensor]:
    """Run ``model`` (with ``provider``, normally FullProvider) over ``sequences``;
    returns per layer the FFN inputs of every token, [N, d_model] float32 on CPU."""
    recorder = _Recorder(provider, model.config.num_layers)
    for i, seq in enumerate(tqdm(sequences, desc="collect", unit="seq", disable=not show_bar)):
        cache = model.new_cache(1, seq.numel())
        model.forward(seq.reshape(1, -1), cache, [0], recorder)
        if progress:
            progress(i + 1, len(sequences))
    return [torch.cat(rows) for rows in recorder.inputs]


def full_weights(bank, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer's FULL neurons from a WeightBank: ([F, nvec, d], [F] | None)."""
    return bank.vectors(layer, Precision.FULL), bank.bias(layer)
