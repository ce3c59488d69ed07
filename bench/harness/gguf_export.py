"""GGUF files for the llama.cpp peer, built once under the bench's out dir.

``f16_from_gguf``: the same model as a quantised GGUF, every weight matrix
dequantised to F16 (1-D norm weights stay F32, as llama.cpp's own converter
writes them for ``--outtype f16``), every metadata field copied, the file type
set to MOSTLY_F16. Written to a temp name and renamed, so a half-written file
is never picked up."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
MOSTLY_F16 = 1  # llama_ftype LLAMA_FTYPE_MOSTLY_F16


def f16_from_gguf(src: Path, dst: Path) -> Path:
    """Write (or reuse, when newer than ``src``) an F16 copy of the GGUF ``src`` at ``dst``."""
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    import gguf
    from gguf.quants import dequantize

    from m2cache.convert.gguf import open_reader

    reader = open_reader(src)
    arch = reader.fields["general.architecture"].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue  # the writer writes the header and the architecture itself
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = MOSTLY_F16 if field.name == "general.file_type" else field.contents()
            writer.add_key_value(field.name, value, vtype, sub)
        if "general.file_type" not in reader.fields:
            writer.add_file_type(MOSTLY_F16)
        for t in reader.tensors:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)  # [rows, cols] or [n]
            writer.add_tensor(t.name, w.astype(np.float16) if w.ndim >= 2 else np.array(w, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (F16 of %s)", dst, src.name)
    return dst


def quant_label(path: Path) -> str:
    """"Q4_1", "F16", ...: the type most of the file's weight matrices use."""
    from collections import Counter

    from m2cache.convert.gguf import open_reader

    reader = open_reader(path)
    counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    return counts.most_common(1)[0][0]


def ffn_bytes(path: Path) -> int:
    """Bytes of the FFN weight matrices as stored in the file (what a token's FFN reads)."""
    from m2cache.convert.gguf import open_reader

    reader = open_reader(path)
    return sum(int(t.n_bytes) for t in reader.tensors if ".ffn_" in t.name)


def f16_from_hf(hf_dir: Path, dst: Path) -> Path:
    """An F16 GGUF of a Hugging Face llama checkpoint (the synthetic model) for llama.cpp, written
    the way llama.cpp's convert_hf_to_gguf.py does (names mapped, q/k rows permuted), with a
    placeholder byte-level vocabulary of the model's size: the bench feeds token ids, never text.
    Reused while newer than the checkpoint's config.json."""
    import json

    import gguf
    from safetensors import safe_open

    from m2cache.convert.gguf import LAYER_PARTS, TOP_NAMES

    config = json.loads((hf_dir / "config.json").read_text())
    if dst.is_file() and dst.stat().st_mtime >= (hf_dir / "config.json").stat().st_mtime:
        return dst
    if config.get("model_type") != "llama":
        raise ValueError(f"{hf_dir}: only llama checkpoints are exported to GGUF here")
    heads, kv_heads, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    to_gguf = {hf: g for g, hf in TOP_NAMES.items()}
    layer_to_gguf = {hf: g for g, hf in LAYER_PARTS.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(hf_dir.name)
        w.add_file_type(MOSTLY_F16)
        w.add_vocab_size(config["vocab_size"])
        w.add_block_count(config["num_hidden_layers"])
        w.add_context_length(config.get("max_position_embeddings", 2048))
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_rope_dimension_count(hidden // heads)
        w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
        _placeholder_vocab(w, config["vocab_size"], config.get("bos_token_id", 1), config.get("eos_token_id", 2))
        for shard in sorted(hf_dir.glob("*.safetensors")):
            with safe_open(str(shard), framework="np") as f:
                for name in f.keys():
                    arr = f.get_tensor(name)
                    if name in to_gguf:
                        gname = to_gguf[name]
                    else:
                        layer, part = name.removeprefix("model.layers.").split(".", 1)
                        gname = f"blk.{layer}.{layer_to_gguf[part]}"
                    if ".q_proj." in name or ".k_proj." in name:
                        arr = _llamacpp_permute(arr, heads if ".q_proj." in name else kv_heads)
                    w.add_tensor(gname, arr.astype(np.float16) if arr.ndim >= 2 else arr.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k permutation (the inverse of m2cache.convert.gguf.unpermute_rotary)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _placeholder_vocab(w, vocab_size: int, bos: int, eos: int) -> None:
    """A gpt2-style vocabulary of ``vocab_size`` distinct tokens (llama.cpp needs one to load)."""
    tokens = [f"<t{i}>" for i in range(vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab_size)
    w.add_token_merges(["< t"])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)


def q4_1_with_llamacpp(src: Path, dst: Path, threads: int = 2) -> Path:
    """``src`` quantised to Q4_1 by llama.cpp's own quantiser (llama_model_quantize), once."""
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 3  # LLAMA_FTYPE_MOSTLY_Q4_1
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".partial")
    try:
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantise {src} to Q4_1")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
