"""Model shapes the planner reasons about: the few widths that set bytes and
flops per token. From a converted store (its manifest), a Hugging Face
checkpoint directory (its config.json), or a name (Llama-2 7B / 13B / 70B, so
docs can be planned without the weights)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from m2cache.codec.format import DTYPES, Precision, RecordLayout, int4_group_size
from m2cache.errors import InvalidArgument
from m2cache.model.config import ModelConfig

# Published Llama-2 configurations (Hugging Face meta-llama/Llama-2-*-hf config.json).
_LLAMA2 = {
    "llama-2-7b": dict(num_layers=32, d_model=4096, d_ffn=11008, num_heads=32, num_kv_heads=32),
    "llama-2-13b": dict(num_layers=40, d_model=5120, d_ffn=13824, num_heads=40, num_kv_heads=40),
    "llama-2-70b": dict(num_layers=80, d_model=8192, d_ffn=28672, num_heads=64, num_kv_heads=8),
}
ALIASES = {"7b": "llama-2-7b", "13b": "llama-2-13b", "70b": "llama-2-70b"}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Widths of a decoder-only model with neuron-bundled FFNs (codec/format.py)."""

    name: str
    family: str  # "llama" | "opt"
    num_layers: int
    d_model: int
    d_ffn: int
    num_heads: int
    num_kv_heads: int
    vocab: int
    dtype: str = "float16"  # checkpoint dtype: FULL records and dense tensors
    tied: bool = False
    policy: dict | None = None  # the store's band ratios {"full", "int8", "int4"} when it has a policy

    def __post_init__(self) -> None:
        if min(self.num_layers, self.d_model, self.d_ffn, self.num_heads, self.num_kv_heads, self.vocab) < 1:
            raise InvalidArgument(f"model shape {self.name}: every width must be >= 1")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"model shape {self.name}: dtype {self.dtype!r} not one of {', '.join(DTYPES)}")

    # ---- records ------------------------------------------------------------------
    @property
    def layout(self) -> RecordLayout:
        relu = self.family == "opt"
        return RecordLayout(self.d_model, 2 if relu else 3, relu, self.dtype, int4_group_size(self.d_model))

    def record_bytes(self, prec: Precision) -> int:
        return self.layout.num_bytes(prec)

    def layer_ffn_bytes(self, prec: Precision = Precision.FULL) -> int:
        return self.d_ffn * self.record_bytes(prec)

    @property
    def ffn_bytes(self) -> int:
        """Every neuron of every layer at FULL precision."""
        return self.num_layers * self.layer_ffn_bytes(Precision.FULL)

    # ---- dense parts ----------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def attention_params(self) -> int:
        """Per layer: q and o [d, d], k and v [kv * head_dim, d]."""
        kv = self.num_kv_heads * self.head_dim
        return 2 * self.d_model * self.d_model + 2 * kv * self.d_model

    @property
    def dense_params(self) -> int:
        """Everything but the FFN neurons: attention, embeddings, head (norms are negligible)."""
        head = 0 if self.tied else self.vocab * self.d_model
        return self.num_layers * self.attention_params + self.vocab * self.d_model + head

    @property
    def dense_bytes(self) -> int:
        return self.dense_params * DTYPES[self.dtype].itemsize

    @property
    def decode_dense_params(self) -> int:
        """Dense weights a decode step multiplies by: every layer's attention and the
        head (the embedding is a row lookup)."""
        return self.num_layers * self.attention_params + self.vocab * self.d_model

    @property
    def params(self) -> int:
        return self.dense_params + self.num_layers * self.d_ffn * self.layout.nvec * self.d_model

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV cache bytes one token of context adds (all layers)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def flops_per_token(self, ffn_neurons_fraction: float = 1.0) -> float:
        """Multiply-adds x 2 of one decoded token: dense GEMVs (the embedding is a lookup,
        so not counted) + the FFN over the fraction of neurons computed."""
        ffn = self.num_layers * self.d_ffn * self.layout.nvec * self.d_model * ffn_neurons_fraction
        return 2.0 * (self.decode_dense_params + ffn)


def named(name: str) -> ModelShape:
    """Llama-2 7B / 13B / 70B by name (``llama-2-7b`` or ``7b``)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in _LLAMA2:
        raise InvalidArgument(f"unknown model shape {name!r}; known: {', '.join(sorted(_LLAMA2))}")
    return ModelShape(name=key, family="llama", vocab=32000, dtype="float16", **_LLAMA2[key])


def from_hf_config(hf: dict, name: str, dtype: str | None = None, policy: dict | None = None) -> ModelShape:
    cfg = ModelConfig.from_hf(hf)
    dtype = dtype or hf.get("torch_dtype") or hf.get("dtype") or "float16"
    return ModelShape(name=name, family=cfg.family, num_layers=cfg.num_layers, d_model=cfg.hidden_size,
                      d_ffn=cfg.intermediate_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                      vocab=cfg.vocab_size, dtype=str(dtype), tied=cfg.tie_word_embeddings, policy=policy)


def from_store(path: Path) -> ModelShape:
    """The shape of a converted store, with its precision policy's ratios when it has one."""
    from m2cache.store.reader import NeuronStore

    store = NeuronStore(path)
    try:
        m = store.manifest
        policy = _store_policy(path)
        shape = from_hf_config(m.hf_config, Path(path).name, m.dtype, policy)
        if (shape.d_ffn, shape.num_layers, shape.d_model) != (m.d_ffn, m.num_layers, m.d_model):
            raise InvalidArgument(f"store {path}: manifest and hf_config disagree on the widths")
        return shape
    finally:
        store.close()


def _store_policy(path: Path) -> dict | None:
    try:
        from m2cache.ranker import storage

        policy = storage.load_policy(str(path))
    except Exception:  # no policy (or no ranker data) in the store: all FULL
        return None
    return dict(policy["ratios"]) if policy and policy.get("ratios") else None


def resolve(model: str) -> ModelShape:
    """``model``: a store directory (data.mdb), a checkpoint directory (config.json) or a shape name."""
    path = Path(model)
    if (path / "data.mdb").is_file():
        return from_store(path)
    if (path / "config.json").is_file():
        hf = json.loads((path / "config.json").read_text())
        return from_hf_config(hf, path.name)
    if path.exists():
        raise InvalidArgument(f"{model}: neither a converted store (data.mdb) nor a checkpoint (config.json)")
    return named(model)
