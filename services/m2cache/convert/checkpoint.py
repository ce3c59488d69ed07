"""Read side of a Hugging Face checkpoint directory, for the converter
(``open_checkpoint`` also opens GGUF files: convert/gguf.py).

Opening a :class:`Checkpoint` reads ``config.json``, detects the model family and
reads every safetensors header (single file or sharded via
``model.safetensors.index.json``) so that a missing, truncated or inconsistent
checkpoint fails before anything is written. Tensors are then read one at a
time with ``safetensors.safe_open`` so memory stays near the largest tensor.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from m2cache.errors import CheckpointError, InvalidArgument, UnsupportedArchitecture

log = logging.getLogger(__name__)

# HF model_type -> m2cache family.
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt"}
SUPPORTED_TEXT = "llama (model_type llama, mistral, qwen2) and opt"
# safetensors dtype code -> store dtype name (core.format.DTYPES).
ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Tokenizer / config files carried into the store, when present.
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives, from its file's safetensors header."""

    file: Path
    dtype: str  # safetensors code, e.g. "F16"
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class Architecture:
    """What the converter needs to know about the model's FFN."""

    model_type: str
    family: str  # "llama" | "opt"
    ffn_kind: str  # "swiglu" | "relu"
    num_layers: int
    d_model: int
    d_ffn: int

    @classmethod
    def from_config(cls, config: dict) -> "Architecture":
        """Detect the family; UnsupportedArchitecture for anything we cannot serve."""
        model_type = config.get("model_type")
        family = FAMILIES.get(model_type)
        if family is None:
            raise UnsupportedArchitecture(f"model_type {model_type!r} is not supported; supported families: {SUPPORTED_TEXT}")
        if family == "llama":
            _check_llama(config)
            return cls(model_type, family, "swiglu", _int(config, "num_hidden_layers"),
                       _int(config, "hidden_size"), _int(config, "intermediate_size"))
        _check_opt(config)
        return cls(model_type, family, "relu", _int(config, "num_hidden_layers"),
                   _int(config, "hidden_size"), _int(config, "ffn_dim"))


def _check_llama(config: dict) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitecture(f"{config['model_type']} with hidden_act {act!r}: only silu (SwiGLU) is supported")
    if config.get("mlp_bias", False):
        raise UnsupportedArchitecture(f"{config['model_type']} with mlp_bias=true: SwiGLU neurons without biases only")


def _check_opt(config: dict) -> None:
    act = config.get("activation_function", "relu")
    if act != "relu":
        raise UnsupportedArchitecture(f"opt with activation_function {act!r}: only relu is supported")
    if not config.get("enable_bias", True):
        raise UnsupportedArchitecture("opt with enable_bias=false: the ReLU neuron format needs the fc1 bias")


def _int(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def read_config(hf_dir: Path) -> dict:
    """config.json as a dict; CheckpointError if missing or not a JSON object."""
    path = hf_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not a Hugging Face checkpoint directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > size - 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header: {err}") from None
    data_len = size - 8 - n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            info = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), end - start)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
        if end > data_len:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at data byte {end} but the file holds {data_len}")
        out[name] = info
    return out


def shard_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file, or the shards of the index)."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{index}: invalid index ({err!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists missing shard(s): {', '.join(missing)}")
        return [hf_dir / f for f in files]
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {hf_dir}: only safetensors checkpoints are supported")


class Checkpoint:
    """An opened, validated Hugging Face checkpoint directory."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.path = Path(hf_dir)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory")
        self.config = read_config(self.path)
        self.arch = Architecture.from_config(self.config)
        self.tensors: dict[str, TensorInfo] = {}
        for file in shard_files(self.path):
            self.tensors.update(read_header(file))
        self.ffn_base = self._find_ffn_base()
        self.dtype = self._ffn_dtype()
        self._ffn_names = {n for layer in range(self.arch.num_layers) for n in self.ffn_names(layer).values()}
        for layer in range(self.arch.num_layers):
            self._check_layer(layer)
        for name in self.dense_names():
            if self.tensors[name].dtype not in ST_DTYPES:
                raise CheckpointError(f"tensor {name!r}: dtype {self.tensors[name].dtype} not supported ({', '.join(ST_DTYPES)})")

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _ffn_suffixes(self, layer: int) -> dict[str, str]:
        if self.arch.family == "llama":
            return {r: f"{layer}.mlp.{r}_proj.weight" for r in ("gate", "up", "down")}
        return {"fc1": f"{layer}.fc1.weight", "fc1_bias": f"{layer}.fc1.bias", "fc2": f"{layer}.fc2.weight"}

    def _find_ffn_base(self) -> str:
        """Name prefix before the layer index, e.g. "model.layers." or "model.decoder.layers."."""
        suffix = next(iter(self._ffn_suffixes(0).values()))
        for name in self.tensors:
            if name.endswith("layers." + suffix):
                return name[: -len(suffix)]
        raise CheckpointError(f"{self.path}: no tensor named '*layers.{suffix}': tensors missing for layer 0")

    def _ffn_dtype(self) -> str:
        code = self.tensors[self.ffn_base + next(iter(self._ffn_suffixes(0).values()))].dtype
        if code not in ST_DTYPES:
            raise CheckpointError(f"{self.path}: FFN dtype {code} not supported; supported: float32, float16, bfloat16")
        return ST_DTYPES[code]

    def ffn_names(self, layer: int) -> dict[str, str]:
        """Role -> tensor name: llama gate/up/down, opt fc1/fc1_bias/fc2."""
        return {role: self.ffn_base + s for role, s in self._ffn_suffixes(layer).items()}

    def _check_layer(self, layer: int) -> None:
        d, f = self.arch.d_model, self.arch.d_ffn
        expected = {"gate": (f, d), "up": (f, d), "down": (d, f), "fc1": (f, d), "fc1_bias": (f,), "fc2": (d, f)}
        for role, name in self.ffn_names(layer).items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} missing for layer {layer}")
            if info.shape != expected[role]:
                raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                      f"config.json implies {list(expected[role])}")
            if role != "fc1_bias" and ST_DTYPES.get(info.dtype) != self.dtype:
                raise CheckpointError(f"{info.file}: tensor {name!r} is {info.dtype}, other FFN weights are {self.dtype}")

    def dense_names(self) -> list[str]:
        """Every tensor that is not an FFN neuron weight (OPT fc2 bias is dense)."""
        return [n for n in self.tensors if n not in self._ffn_names]

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (a copy in memory, in its checkpoint dtype)."""
        info = self.tensors[name]
        try:
            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {err}") from err

    def aux_files(self) -> list[Path]:
        """Tokenizer and config files present in the directory."""
        return [self.path / n for n in AUX_FILES if (self.path / n).is_file()]

    @property
    def tokenizer_dir(self) -> Path:
        """Directory transformers can load the checkpoint's tokenizer from."""
        return self.path


def open_checkpoint(source: str | os.PathLike, dtype: str | None = None, progress: bool = False) -> Checkpoint:
    """A Hugging Face checkpoint directory, or a GGUF file (dequantised to ``dtype``, default float16)."""
    path = Path(source)
    if path.is_file():
        from m2cache.convert.gguf import GGUFCheckpoint  # gguf and numpy dequantisation load only here

        return GGUFCheckpoint(path, dtype, progress)
    if dtype is not None:
        raise InvalidArgument("--dtype applies to GGUF files; a Hugging Face checkpoint keeps its own dtype")
    return Checkpoint(path)
