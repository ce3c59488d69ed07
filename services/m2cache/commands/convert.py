"""``m2cache convert SOURCE STORE_DIR``: build a neuron store from a Hugging Face checkpoint
directory or a GGUF file (dispatched on the path: convert.checkpoint.open_checkpoint)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from m2cache.convert.writer import convert
from m2cache.codec.format import CODECS
from m2cache.convert.prune import METHODS, PruneSpec
from m2cache.errors import InvalidArgument


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``convert`` subcommand."""
    p = subparsers.add_parser("convert", help="convert a Hugging Face checkpoint or a GGUF file into an m2cache store",
                              description="Convert a Hugging Face checkpoint (llama, mistral, qwen2, opt) or a GGUF "
                                          "file (llama, mistral, qwen2; dequantised) into an LMDB neuron store with "
                                          "FULL, INT8 and INT4 records.")
    p.add_argument("hf_dir", metavar="SOURCE", help="checkpoint directory (config.json + *.safetensors) or a .gguf file")
    p.add_argument("store_dir", metavar="STORE_DIR", help="store directory to create")
    p.add_argument("--force", action="store_true", help="replace STORE_DIR if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--prune", type=float, default=None, metavar="SPARSITY",
                   help="prune every FFN neuron vector to this fraction of zeros, in [0, 1) (attention stays dense)")
    p.add_argument("--prune-method", choices=METHODS, default="magnitude",
                   help="magnitude (|W|) or wanda (|W| * input norm; needs --text) (default magnitude)")
    p.add_argument("--text", default=None, metavar="FILE", help="calibration text for --prune-method wanda")
    p.add_argument("--calib-tokens", type=int, default=65536, help="calibration tokens used at most (default 65536)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="GGUF only: the float type its weights are dequantised to (default fp16)")
    p.add_argument("--codec", choices=CODECS, default=None,
                   help="record storage: bitmap (sparse, the default with --prune) or dense")
    return p


def prune_spec(args: argparse.Namespace) -> PruneSpec | None:
    """The pruning asked for on the command line (validated), or None."""
    if args.prune is None:
        if args.prune_method != "magnitude" or args.text:
            raise InvalidArgument("--prune-method and --text only apply with --prune SPARSITY")
        return None
    return PruneSpec(args.prune, args.prune_method, args.text, args.calib_tokens)


def main(args: argparse.Namespace) -> int:
    """Run the conversion and print a one-line summary."""
    start = time.monotonic()
    manifest = convert(args.hf_dir, args.store_dir, force=args.force, progress=args.progress,
                       prune=prune_spec(args), codec=args.codec, dtype=args.dtype)
    seconds = time.monotonic() - start
    size = sum(f.stat().st_size for f in Path(args.store_dir).iterdir() if f.is_file())
    print(f"converted {manifest.hf_config.get('model_type')} ({manifest.family}, {manifest.dtype}): "
          f"{manifest.num_layers} layers x {manifest.d_ffn} neurons, {len(manifest.dense)} dense tensors, "
          f"store {size / 2**20:.1f} MiB at {args.store_dir} in {seconds:.1f} s"
          + (f", pruned {manifest.prune['method']} {manifest.prune['sparsity']:g}" if manifest.prune else "")
          + f", codec {manifest.codec}")
    return 0
