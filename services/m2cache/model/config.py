"""ModelConfig: the few numbers the reference model needs, parsed from a
Hugging Face ``config.json`` dict. Two families share one code path each:
"llama" (llama, mistral, qwen2: RMSNorm, RoPE, GQA, SwiGLU FFN) and
"opt" (LayerNorm, learned positions, ReLU FFN)."""
from __future__ import annotations

from dataclasses import dataclass

from m2cache.errors import UnsupportedArchitecture

LLAMA_TYPES = ("llama", "mistral", "qwen2")
OPT_TYPES = ("opt",)
SUPPORTED = "llama family (model_type llama, mistral, qwen2) and opt"
ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding: ``rope_type`` "default" or "llama3" (frequency scaling)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    family: str  # "llama" | "opt"
    model_type: str
    vocab_size: int
    hidden_size: int  # d_model
    intermediate_size: int  # d_ffn: neurons per layer
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    rope: RopeConfig | None = None  # llama family only
    sliding_window: int | None = None  # mistral
    do_layer_norm_before: bool = True  # opt
    word_embed_proj_dim: int = 0  # opt; != hidden_size -> project_in / project_out
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self):
        if self.family not in ("llama", "opt"):
            raise UnsupportedArchitecture(f"unknown family {self.family!r}; supported: {SUPPORTED}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedArchitecture(f"{self.num_heads} heads not a multiple of {self.num_kv_heads} kv heads")

    @property
    def ffn_kind(self) -> str:
        return "swiglu" if self.family == "llama" else "relu"

    @property
    def nvec(self) -> int:
        """Vectors per neuron: (gate, up, down) or (fc1, fc2)."""
        return 3 if self.family == "llama" else 2

    @classmethod
    def from_hf(cls, hf_config: dict) -> "ModelConfig":
        """Parse a Hugging Face config dict; raise UnsupportedArchitecture otherwise."""
        model_type = hf_config.get("model_type")
        if model_type in LLAMA_TYPES:
            return _llama_from_hf(hf_config)
        if model_type in OPT_TYPES:
            return _opt_from_hf(hf_config)
        raise UnsupportedArchitecture(f"model_type {model_type!r} is not supported; supported: {SUPPORTED}")


def _eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise UnsupportedArchitecture(f"unsupported configuration: {what}; supported: {SUPPORTED}")


def _rope_from_hf(hf: dict) -> RopeConfig:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (4.x)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    _require(rope_type in ROPE_TYPES, f"rope_type {rope_type!r} (only {', '.join(ROPE_TYPES)})")
    _require(params.get("partial_rotary_factor", 1.0) == 1.0, "partial rotary embeddings")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    return RopeConfig(
        theta=float(theta), rope_type=rope_type, factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _llama_from_hf(hf: dict) -> ModelConfig:
    model_type = hf["model_type"]
    _require(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r} (SwiGLU needs silu)")
    _require(not hf.get("mlp_bias", False), "mlp_bias (neurons carry no bias in the llama family)")
    _require(not (model_type == "qwen2" and hf.get("use_sliding_window")), "qwen2 use_sliding_window")
    num_heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="llama", model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
        rope=_rope_from_hf(hf), sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        eos_token_ids=_eos_ids(hf), bos_token_id=hf.get("bos_token_id"),
    )


def _opt_from_hf(hf: dict) -> ModelConfig:
    _require(hf.get("activation_function", "relu") == "relu", f"opt activation {hf.get('activation_function')!r}")
    _require(not hf.get("_remove_final_layer_norm", False), "opt _remove_final_layer_norm")
    hidden, num_heads = hf["hidden_size"], hf["num_attention_heads"]
    enable_bias = bool(hf.get("enable_bias", True))
    return ModelConfig(
        family="opt", model_type="opt", vocab_size=hf["vocab_size"], hidden_size=hidden,
        intermediate_size=hf["ffn_dim"], num_layers=hf["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=num_heads, head_dim=hidden // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm_eps=1e-5,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=enable_bias, o_bias=enable_bias,
        do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
        word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
        eos_token_ids=_eos_ids(hf), bos_token_id=hf.get("bos_token_id"),
    )
