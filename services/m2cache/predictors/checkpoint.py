"""Resumable training: a side file beside the store's LMDB files holding every
finished layer's tensors, written atomically after each layer. Re-running the
same job (same text, settings and store) continues after the last finished
layer; a different job starts over. Removed once the predictor is saved."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FILENAME = "train-predictor.partial"


def fingerprint(**fields) -> str:
    """Stable hash of the job's settings (text included)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class TrainCheckpoint:
    """{("layer" | "ahead", i): {tensor name: tensor}} plus each one's final loss."""

    def __init__(self, store_dir, key: str):
        self.path = Path(store_dir) / FILENAME
        self.key = key
        self.parts: dict[str, dict] = {}
        self.losses: dict[str, float] = {}
        if self.path.is_file():
            try:
                saved = torch.load(self.path, weights_only=True)
            except Exception as err:  # a torn or foreign file: start over
                log.warning("ignoring unreadable training checkpoint %s (%s)", self.path, err)
                return
            if saved.get("key") == key:
                self.parts, self.losses = saved["parts"], saved["losses"]
                log.info("resuming predictor training: %d parts already done", len(self.parts))
            else:
                log.info("training checkpoint %s is for another job: starting over", self.path)

    def done(self, name: str) -> bool:
        return name in self.parts

    def add(self, name: str, tensors: dict[str, torch.Tensor], loss: float) -> None:
        self.parts[name] = {k: v.detach().cpu().clone() for k, v in tensors.items()}
        self.losses[name] = loss
        tmp = self.path.with_suffix(".tmp")
        torch.save({"key": self.key, "parts": self.parts, "losses": self.losses}, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
