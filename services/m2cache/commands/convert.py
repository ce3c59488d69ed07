"""``m2cache convert HF_DIR STORE_DIR``: build a neuron store from a Hugging Face checkpoint."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from m2cache.core.convert import convert


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``convert`` subcommand."""
    p = subparsers.add_parser("convert", help="convert a Hugging Face safetensors checkpoint into an m2cache store",
                              description="Convert a Hugging Face checkpoint (llama, mistral, qwen2, opt) into an "
                                          "LMDB neuron store with FULL, INT8 and INT4 records.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("store_dir", metavar="STORE_DIR", help="store directory to create")
    p.add_argument("--force", action="store_true", help="replace STORE_DIR if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    """Run the conversion and print a one-line summary."""
    start = time.monotonic()
    manifest = convert(args.hf_dir, args.store_dir, force=args.force, progress=args.progress)
    seconds = time.monotonic() - start
    size = sum(f.stat().st_size for f in Path(args.store_dir).iterdir() if f.is_file())
    print(f"converted {manifest.hf_config.get('model_type')} ({manifest.family}, {manifest.dtype}): "
          f"{manifest.num_layers} layers x {manifest.d_ffn} neurons, {len(manifest.dense)} dense tensors, "
          f"store {size / 2**20:.1f} MiB at {args.store_dir} in {seconds:.1f} s")
    return 0
