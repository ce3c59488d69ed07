"""Conversion throughput versus a plain file copy (a benchmark, not a test).

Builds a synthetic fp16 Llama-shape checkpoint (one safetensors shard per layer,
written layer by layer so this process never holds the model), copies its bytes
with shutil.copyfile, then runs convert() in a child process and reports its
throughput, the store size and the child's peak RSS. Everything is deleted after.

    python bench/bench_convert.py [--gb 2.0] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, FFN, VOCAB, HEADS = 2048, 5632, 32000, 16
BYTES = 2  # fp16


def layer_bytes() -> int:
    attn = 4 * HIDDEN * HIDDEN  # q, k, v, o
    return BYTES * (attn + 3 * HIDDEN * FFN + 2 * HIDDEN)


def make_checkpoint(out: Path, num_layers: int) -> int:
    """Write config.json, one shard per layer plus embeddings/head, and the index; returns bytes."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": num_layers, "num_attention_heads": HEADS,
              "num_key_value_heads": HEADS, "vocab_size": VOCAB, "hidden_act": "silu", "torch_dtype": "float16",
              "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * 0.02).half()

    shards = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN)),
              ("model.norm.weight", (HIDDEN,))]
    for i in range(-1, num_layers):
        if i < 0:
            tensors = {name: rand(*shape) for name, shape in shards}
        else:
            p = f"model.layers.{i}."
            tensors = {p + f"self_attn.{x}_proj.weight": rand(HIDDEN, HIDDEN) for x in "qkvo"}
            tensors |= {p + "mlp.gate_proj.weight": rand(FFN, HIDDEN), p + "mlp.up_proj.weight": rand(FFN, HIDDEN),
                        p + "mlp.down_proj.weight": rand(HIDDEN, FFN)}
            tensors |= {p + n: rand(HIDDEN) for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}
        fname = f"model-{i + 1:05d}-of-{num_layers + 1:05d}.safetensors"
        save_file(tensors, out / fname)
        weight_map |= {name: fname for name in tensors}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return total


def copy_bytes(src: Path, dst: Path) -> float:
    """Copy every file of src into dst (fsynced); returns seconds."""
    dst.mkdir()
    start = time.perf_counter()
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, dst / f.name)
        with open(dst / f.name, "rb+") as fh:
            os.fsync(fh.fileno())
    return time.perf_counter() - start


def child(hf_dir: str, store_dir: str) -> None:
    """Run in the child process: convert and print timings as JSON."""
    from m2cache.convert.writer import convert

    base_rss = peak_rss_kib()
    start, cpu = time.perf_counter(), time.process_time()
    convert(hf_dir, store_dir, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "import_rss_kib": base_rss, "peak_rss_kib": peak_rss_kib()}))


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM). Unlike ru_maxrss it does not carry the
    parent's peak across fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_convert(hf: Path, store: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(hf), str(store)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parents[2]), help="where to make the temp dir")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    num_layers = max(1, round((args.gb * 1e9 - 2 * BYTES * VOCAB * HIDDEN) / layer_bytes()))
    free = shutil.disk_usage(args.dir).free
    need = int(args.gb * 1e9 * 5)  # checkpoint + copy + store (~2.5x with page rounding)
    if free < need:
        sys.exit(f"need ~{need / 1e9:.1f} GB free in {args.dir}, have {free / 1e9:.1f} GB")
    tmp = Path(tempfile.mkdtemp(prefix="m2cache-bench-convert-", dir=args.dir))
    try:
        report(tmp, num_layers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(tmp: Path, num_layers: int) -> None:
    start = time.perf_counter()
    nbytes = make_checkpoint(tmp / "hf", num_layers)
    print(f"synthetic checkpoint: {num_layers} layers, hidden {HIDDEN}, ffn {FFN}, vocab {VOCAB}, fp16, "
          f"{nbytes / 1e9:.2f} GB in {num_layers + 1} shards (built in {time.perf_counter() - start:.0f} s)")
    copy_s = copy_bytes(tmp / "hf", tmp / "copy")
    shutil.rmtree(tmp / "copy")
    load = os.getloadavg()[0]
    conv = run_convert(tmp / "hf", tmp / "store")
    store = tmp / "store" / "data.mdb"
    mb = nbytes / 1e6
    print(f"\n{os.cpu_count()} CPUs, load average before convert: {load:.1f}")
    print("| step | seconds (CPU s) | MB/s (input) | output | peak RSS |")
    print("|---|---|---|---|---|")
    print(f"| shutil.copyfile + fsync | {copy_s:.1f} | {mb / copy_s:.0f} | {nbytes / 1e9:.2f} GB | - |")
    print(f"| convert() (child process) | {conv['seconds']:.1f} ({conv['cpu_seconds']:.1f}) | {mb / conv['seconds']:.0f} | "
          f"{store.stat().st_size / 1e9:.2f} GB store ({disk_bytes(tmp / 'store') / 1e9:.2f} GB on disk) | "
          f"{conv['peak_rss_kib'] / 1024:.0f} MiB (after imports {conv['import_rss_kib'] / 1024:.0f} MiB) |")


if __name__ == "__main__":
    main()
