"""Rankers of every store under a root, loaded lazily and cached in memory, and
predictor training jobs (one at a time per model) that refresh the cache.

The service never keeps a store's LMDB handle open: predictor and policy are
read once into memory (storage.py, a short-lived handle), and a training job
opens the store only while it runs. A per-model lock keeps those two apart
(py-lmdb allows one handle per environment and process)."""
from __future__ import annotations

import threading
from pathlib import Path

from m2cache.errors import FailedPrecondition, InvalidArgument, NotFound
from m2cache.predictors.pipeline import Progress, TrainJob, run_training
from m2cache.predictors.ranking import Ranker


class RankerCatalog:
    """Model name -> :class:`Ranker`. Thread-safe."""

    def __init__(self, root: Path, device: str = "cpu"):
        self.root = Path(root)
        self.device = device
        self._rankers: dict[str, Ranker] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._training: set[str] = set()
        self._guard = threading.Lock()

    def path(self, model: str) -> Path:
        if not model or "/" in model or model.startswith("."):
            raise InvalidArgument(f"bad model name {model!r}: expected a store directory name")
        path = self.root / model
        if not (path / "data.mdb").is_file():
            raise NotFound(f"unknown model {model!r} under {self.root}")
        return path

    def _lock(self, model: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(model, threading.Lock())

    def get(self, model: str) -> Ranker:
        """The cached ranker; FailedPrecondition if the store has no predictor."""
        ranker = self._rankers.get(model)
        if ranker is None:
            path = self.path(model)
            with self._lock(model):
                ranker = self._rankers.get(model) or self._load(model, path)
        return ranker

    def _load(self, model: str, path: Path) -> Ranker:
        ranker = Ranker.from_store(path)
        ranker.predictor = ranker.predictor.to(self.device)
        self._rankers[model] = ranker
        return ranker

    def train(self, model: str, job: TrainJob, progress: Progress | None = None) -> int:
        """Run a training job; afterwards the catalog serves the new version."""
        path = self.path(model)
        with self._guard:
            if model in self._training:
                raise FailedPrecondition(f"a predictor for {model!r} is already being trained")
            self._training.add(model)
        try:
            with self._lock(model):
                version = run_training(path, job, progress)
                self._rankers.pop(model, None)
                self._load(model, path)
            return version
        finally:
            with self._guard:
                self._training.discard(model)
