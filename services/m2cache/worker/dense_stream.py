"""Resident parts over the device budget: the attention projections of the
layers that do not fit are streamed through the tiers every step, overlapped
with compute (M2Cache loads >= 2 layers ahead of the layer being computed).

Hooked into the FFN provider: when layer i's FFN is ranked, layer i+1's
attention must be on the device (its fetch started a layer earlier), layer
i+2's fetch starts, and a streamed layer i is dropped (it has been used)."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from m2cache.codec.format import Manifest
from m2cache.errors import FailedPrecondition
from m2cache.model.model import CausalLM

LOOKAHEAD = 2


def plan_resident(manifest: Manifest, model_attention_names: Callable[[int], list[str]], budget_bytes: int,
                  dtype: torch.dtype = torch.float32) -> tuple[list[str], dict[int, list[str]]]:
    """(resident dense names, {streamed layer: its attention tensor names}). Embeddings,
    head and norms always stay; attention layers stay first-come while they fit."""
    def nbytes(name: str) -> int:
        meta = manifest.dense[name]
        return int(torch.Size(meta["shape"]).numel()) * dtype.itemsize

    per_layer = {i: model_attention_names(i) for i in range(manifest.num_layers)}
    attention = {n for names in per_layer.values() for n in names}
    resident = [n for n in manifest.dense if n not in attention]
    used = sum(nbytes(n) for n in resident)
    streamed: dict[int, list[str]] = {}
    for i, names in per_layer.items():
        size = sum(nbytes(n) for n in names)
        if not streamed and used + size <= budget_bytes:
            resident += names
            used += size
        else:
            streamed[i] = names
    if 0 in streamed or used > budget_bytes:
        raise FailedPrecondition(
            f"dense budget {budget_bytes} B cannot hold the embeddings, norms and layer 0's attention ({used} B needed)")
    return resident, streamed


class AttentionStreamer:
    """Fetches streamed layers' attention ahead of use; see module doc."""

    def __init__(self, model: CausalLM, fetch_dense: Callable[[list[str]], dict[str, torch.Tensor]],
                 streamed: dict[int, list[str]]):
        self.model = model
        self.fetch_dense = fetch_dense
        self.streamed = streamed
        self.bytes = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dense-stream")
        self._pending: dict[int, Future] = {}

    def _start(self, layer: int) -> None:
        if layer in self.streamed and layer not in self._pending:
            self._pending[layer] = self._pool.submit(self.fetch_dense, self.streamed[layer])

    def begin_step(self) -> None:
        for layer in range(1, 1 + LOOKAHEAD):
            self._start(layer)

    def before_ffn(self, layer: int) -> None:
        """Layer ``layer``'s attention has run: drop it if streamed, make sure the next is here."""
        if layer in self.streamed:
            self.model.set_attention(layer, None)
        nxt = layer + 1
        if nxt in self.streamed:
            self._start(nxt)
            tensors = self._pending.pop(nxt).result()
            self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            self.model.set_attention(nxt, tensors)
        self._start(layer + LOOKAHEAD)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

