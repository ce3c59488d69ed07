"""Read side of a GGUF file (llama.cpp's format), for the converter.

:class:`GGUFCheckpoint` presents a ``.gguf`` file as the converter's
:class:`~m2cache.convert.checkpoint.Checkpoint` does a Hugging Face directory:
an HF ``config.json`` built from the GGUF metadata, HF tensor names, one
tensor read at a time (dequantised to float16 by default, bfloat16 or float32
on request), and the tokenizer files (tokenizer.json, tokenizer_config.json,
chat template) rebuilt from the metadata with transformers' GGUF tokenizer
conversion. Opening validates everything (magic, every tensor inside the file,
architecture, shapes, quantisation types, tokenizer) so a bad file fails before
anything is written.

Architectures: ``llama`` (Llama and Mistral GGUFs; llama.cpp's converter
permutes q/k rows for its rotary layout, undone here) and ``qwen2`` (no
permutation; q/k/v biases).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import torch

from m2cache.convert.checkpoint import Architecture, Checkpoint, TensorInfo
from m2cache.errors import CheckpointError, InvalidArgument, UnsupportedArchitecture

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
# --dtype spellings -> store dtype name; the value is the safetensors code kept in TensorInfo.
OUT_DTYPES = {"float16": ("F16", torch.float16), "bfloat16": ("BF16", torch.bfloat16),
              "float32": ("F32", torch.float32)}
DTYPE_ALIASES = {"fp16": "float16", "f16": "float16", "half": "float16", "bf16": "bfloat16",
                 "fp32": "float32", "f32": "float32", "float": "float32"}
SUPPORTED_ARCHS = ("llama", "qwen2")
# GGUF tensor name -> HF name (per-layer parts after "blk.N.").
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
LAYER_PARTS = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def parse_dtype(dtype: str | None) -> str:
    """fp16 / bf16 / fp32 (or the full names) -> store dtype name; default float16."""
    name = DTYPE_ALIASES.get((dtype or "float16").lower(), (dtype or "float16").lower())
    if name not in OUT_DTYPES:
        raise InvalidArgument(f"--dtype {dtype!r}: expected fp16, bf16 or fp32")
    return name


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` is a file starting with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@cache
def _reader_class():
    from gguf import GGUFReader

    class _Reader(GGUFReader):
        """GGUFReader over a plain ndarray view of its memory map: parsing a 50k-token
        vocabulary slices the map ~10^6 times, and np.memmap's per-slice bookkeeping
        made that 3x slower (same bytes, still mapped, nothing copied)."""

        def _build_fields(self, offs, count):
            self.data = self.data.view(np.ndarray)
            return super()._build_fields(offs, count)

    return _Reader


def open_reader(path: Path):
    """A GGUFReader over ``path``; CheckpointError for a file that is not (or no longer) GGUF."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err}") from None
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r}); "
                              "convert takes a Hugging Face checkpoint directory or a .gguf file")
    try:
        return _reader_class()(str(path), "r")
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on damage
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file: {type(err).__name__}: {err}") from None


@cache
def dequantizable(qtype) -> bool:
    """Whether the gguf package can dequantise ``qtype`` (probed on one zero block)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    if qtype not in GGML_QUANT_SIZES:
        return False
    _block, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        return True
    except (NotImplementedError, ValueError, TypeError):
        return False


class Metadata:
    """Typed access to a GGUF file's key/value fields."""

    def __init__(self, reader, path: Path):
        self.fields = reader.fields
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as err:
            raise CheckpointError(f"{self.path}: unreadable metadata {key!r}: {err}") from None

    def int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, list):  # per-layer arrays: m2cache serves uniform layers only
            if not value or any(v != value[0] for v in value):
                raise UnsupportedArchitecture(f"{self.path}: {key} varies by layer ({value[:8]}...)")
            value = value[0]
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{self.path}: metadata {key} must be a positive integer, got {value!r}")
        return int(value)


def hf_config(meta: Metadata, names: set[str], vocab_rows: int) -> dict:
    """A Hugging Face config.json dict for the GGUF's architecture (llama, mistral, qwen2)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{meta.path}: no general.architecture in the GGUF metadata")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedArchitecture(f"{meta.path}: GGUF architecture {arch!r} is not supported; "
                                      f"supported: {', '.join(SUPPORTED_ARCHS)} (Llama, Mistral, Qwen2)")
    a = arch + "."
    scaling = meta.get(a + "rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in names:
        raise UnsupportedArchitecture(f"{meta.path}: rope scaling ({scaling if scaling != 'none' else 'rope_freqs'}) "
                                      "is not supported for GGUF files")
    heads = meta.int(a + "attention.head_count")
    hidden = meta.int(a + "embedding_length")
    head_dim = meta.int(a + "attention.key_length", hidden // heads)
    rotary = meta.int(a + "rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise UnsupportedArchitecture(f"{meta.path}: partial rotary embeddings ({rotary} of {head_dim} dims)")
    name = str(meta.get("general.name", "") or "")
    model_type = "mistral" if arch == "llama" and "mistral" in name.lower() else arch
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[model_type]],
        "model_type": model_type, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": meta.int(a + "feed_forward_length"),
        "num_hidden_layers": meta.int(a + "block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta.int(a + "attention.head_count_kv", heads), "head_dim": head_dim,
        "max_position_embeddings": meta.int(a + "context_length", 2048),
        "rms_norm_eps": float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.get(a + "rope.freq_base", 10000.0)),
        "vocab_size": meta.int(a + "vocab_size", vocab_rows),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float16",  # replaced by the chosen dtype
    }
    if model_type == "qwen2":
        config["use_sliding_window"] = False
    elif model_type == "mistral":
        config["sliding_window"] = None  # llama.cpp runs Mistral GGUFs with full attention
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        value = meta.get("tokenizer.ggml." + key)
        if isinstance(value, (int, np.integer)):
            config[hf_key] = int(value)
    return config


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> Hugging Face name; CheckpointError for anything unexpected."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in LAYER_PARTS:
        return f"model.layers.{m.group(1)}.{LAYER_PARTS[m.group(2)]}"
    raise CheckpointError(f"unexpected tensor {gguf_name!r} for a llama/qwen2 GGUF")


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py ``permute``).

    llama.cpp interleaves each head's two rotary halves: rows [h, 2, D/2] -> [h, D/2, 2].
    w: [n_head * D, ...] (weights [rows, d] or biases [rows]) -> same shape, HF row order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint(Checkpoint):
    """An opened, validated GGUF file, read as a Checkpoint by the writer."""

    def __init__(self, path: str, dtype: str | None = None, progress: bool = False):
        self.path = Path(path)
        self.dtype = parse_dtype(dtype)
        code, self._torch_dtype = OUT_DTYPES[self.dtype]
        reader = open_reader(self.path)
        self.meta = Metadata(reader, self.path)
        size = self.path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise CheckpointError(f"{self.path}: truncated: tensor {t.name!r} ends at byte "
                                      f"{t.data_offset + t.n_bytes}, the file holds {size}")
            if not dequantizable(t.tensor_type):
                raise CheckpointError(f"{self.path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which "
                                      "the gguf package cannot dequantise (supported: F32, F16, BF16, Q4_0, Q4_1, "
                                      "Q5_0, Q5_1, Q8_0 and the K-quants)")
        by_name = {t.name: t for t in reader.tensors}
        if "token_embd.weight" not in by_name:
            raise CheckpointError(f"{self.path}: no token_embd.weight tensor")
        self.config = hf_config(self.meta, set(by_name), int(by_name["token_embd.weight"].shape[-1]))
        self._raw = {hf_name(name): t for name, t in by_name.items()}
        self.config["torch_dtype"] = self.dtype
        self.arch = Architecture.from_config(self.config)
        self._permute = self.config["model_type"] in ("llama", "mistral")
        self.tensors = {name: TensorInfo(self.path, code, tuple(int(s) for s in reversed(t.shape)),
                                         int(np.prod(t.shape)) * self._torch_dtype.itemsize)
                        for name, t in self._raw.items()}
        self._check_dense_shapes()
        self.ffn_base = self._find_ffn_base()
        self._ffn_names = {n for layer in range(self.arch.num_layers) for n in self.ffn_names(layer).values()}
        for layer in range(self.arch.num_layers):
            self._check_layer(layer)
        self._files = tempfile.TemporaryDirectory(prefix="m2cache-gguf-")
        try:
            self._write_aux(Path(self._files.name), progress)
        except BaseException:
            self._files.cleanup()
            raise

    def _check_dense_shapes(self) -> None:
        c = self.config
        d, q, kv = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
        expected = {"model.embed_tokens.weight": (c["vocab_size"], d), "lm_head.weight": (c["vocab_size"], d),
                    "model.norm.weight": (d,)}
        per_layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                     "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
                     "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
                     "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
        for name, info in self.tensors.items():
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
            if m and int(m.group(1)) >= c["num_hidden_layers"]:
                raise CheckpointError(f"{self.path}: tensor {name!r} beyond block_count {c['num_hidden_layers']}")
            want = per_layer.get(m.group(2)) if m else expected.get(name)
            if want is not None and info.shape != want:
                raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(info.shape)}, "
                                      f"the metadata implies {list(want)}")
        for layer in range(c["num_hidden_layers"]):
            for part in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                         "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"):
                if f"model.layers.{layer}.{part}" not in self.tensors:
                    raise CheckpointError(f"{self.path}: layer {layer} lacks its {part} tensor")
        if "model.norm.weight" not in self.tensors:
            raise CheckpointError(f"{self.path}: no output_norm.weight tensor")
        if self.config["model_type"] == "qwen2" and "model.layers.0.self_attn.q_proj.bias" not in self.tensors:
            raise CheckpointError(f"{self.path}: a qwen2 GGUF needs q/k/v biases (attn_q.bias missing)")

    def read(self, name: str) -> torch.Tensor:
        """One tensor, dequantised and in HF layout, in the chosen dtype."""
        from gguf.quants import dequantize

        t = self._raw[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.tensors[name].shape)
        except Exception as err:
            raise CheckpointError(f"{self.path}: cannot dequantise tensor {t.name!r} ({t.tensor_type.name}): {err}") from err
        if self._permute and (".q_proj." in name or ".k_proj." in name):
            heads = self.config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            w = unpermute_rotary(w, heads)
        if not w.flags.writeable or not w.flags.c_contiguous:  # F32 tensors are views of the read-only map
            w = np.array(w, order="C")
        return torch.from_numpy(w).to(self._torch_dtype)

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self._files.name)

    def aux_files(self) -> list[Path]:
        """config.json and the tokenizer files rebuilt from the metadata."""
        return sorted(p for p in self.tokenizer_dir.iterdir() if p.is_file())

    def close(self) -> None:
        self._files.cleanup()

    # ---- generated files ---------------------------------------------------------
    def _write_aux(self, out: Path, progress: bool) -> None:
        (out / "config.json").write_text(json.dumps(self.config, indent=1))
        if "tokenizer.ggml.tokens" not in self.meta:
            log.warning("%s has no tokenizer in its metadata: the store gets no tokenizer files", self.path)
            return
        if progress:  # transformers' conversion takes seconds for a 50k vocabulary
            print(f"building the tokenizer from {self.path.name}'s metadata ...", file=sys.stderr, flush=True)
        build_tokenizer(self.path, out)


def build_tokenizer(gguf_path: Path, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json (+ chat template) from the GGUF metadata, via
    transformers' GGUF tokenizer conversion, saved into ``out``.

    The generic fast tokenizer class is asked directly: it runs the same conversion
    (the same tokenizer.json, special tokens and chat template) as
    ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` without first building a
    model config from the file with the legacy reader (seconds per 50k vocabulary)."""
    import transformers

    with tempfile.TemporaryDirectory(prefix="m2cache-tok-") as tmp:
        try:
            tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            tok.save_pretrained(tmp)
        except Exception as err:  # transformers raises many types for an unconvertible vocabulary
            raise CheckpointError(f"{gguf_path}: cannot build a tokenizer from the GGUF metadata: "
                                  f"{type(err).__name__}: {err}") from err
        for f in Path(tmp).iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)
