"""Shared fixtures: converted stores (session), a NeuronStore server, real
redis-server processes started and stopped by PID."""
from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints import make_tiny_checkpoint, real_model_dir
from smollm2 import convert_smollm2
from m2cache.convert.writer import convert
from tiers import DramHandle, StoreHandle, start_redis

# store name -> how to get its Hugging Face directory
STORE_SOURCES = {
    "tiny-llama": lambda tmp: make_tiny_checkpoint("llama", tmp / "hf-tiny-llama"),
    "tiny-opt": lambda tmp: make_tiny_checkpoint("opt", tmp / "hf-tiny-opt"),
    "stories260k": lambda tmp: real_model_dir("stories260k"),
    "tinystories-656k": lambda tmp: real_model_dir("tinystories-656k"),
}


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> Path:
    """A root directory of converted stores, one per STORE_SOURCES entry."""
    tmp = tmp_path_factory.mktemp("stores")
    root = tmp / "root"
    for name, source in STORE_SOURCES.items():
        convert(source(tmp), root / name, progress=False)
    return root


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted (fp16) once per session: ``<root>/smollm2-135m-instruct``."""
    return convert_smollm2(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def store_service(store_root):
    """A NeuronStore server shared by the non-destructive tests."""
    handle = StoreHandle(store_root, max_batch_ids=1000)
    yield handle
    handle.stop()


@pytest.fixture
def redis_proc():
    """A private redis-server on a free loopback port; stopped by PID at teardown."""
    proc = start_redis()
    yield proc
    proc.stop()


@pytest.fixture
def make_dram(store_service, redis_proc):
    """Factory of DramTier servers over the shared store and this test's Redis."""
    handles = []

    def make(**overrides) -> DramHandle:
        handle = DramHandle(store_service.target, redis_proc.url, **overrides)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()
