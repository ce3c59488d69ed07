"""The synthetic Llama-shape checkpoint the benchmark measures on: TinyLlama's
widths (hidden 2048, ffn 5632, 32 heads, 4 KV heads, vocab 32000), fewer or
more layers by flag, fp16 random weights. Written shard by shard (one layer
per safetensors file) so memory stays near one layer; built once under
``bench/out/`` and reused while its shape matches."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SynthShape:
    """Widths of the synthetic model (defaults: TinyLlama-1.1B's, 16 layers)."""

    num_layers: int = 16
    hidden: int = 2048
    ffn: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    max_positions: int = 2048

    @property
    def name(self) -> str:
        return f"synth-l{self.num_layers}-h{self.hidden}-f{self.ffn}"

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.ffn, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": self.max_positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float16",
            "bos_token_id": 1, "eos_token_id": 2,
        }


def _layer_tensors(s: SynthShape, i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder layer's weights, N(0, 0.02) (norms 1), fp16."""
    head_dim = s.hidden // s.heads
    shapes = {
        "self_attn.q_proj.weight": (s.hidden, s.hidden), "self_attn.k_proj.weight": (s.kv_heads * head_dim, s.hidden),
        "self_attn.v_proj.weight": (s.kv_heads * head_dim, s.hidden), "self_attn.o_proj.weight": (s.hidden, s.hidden),
        "mlp.gate_proj.weight": (s.ffn, s.hidden), "mlp.up_proj.weight": (s.ffn, s.hidden),
        "mlp.down_proj.weight": (s.hidden, s.ffn),
    }
    out = {f"model.layers.{i}.{k}": (torch.randn(shape, generator=g) * 0.02).half() for k, shape in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = torch.ones(s.hidden, dtype=torch.float16)
    return out


def build_checkpoint(s: SynthShape, out_dir: Path, seed: int = 0) -> Path:
    """Write (or reuse) the sharded safetensors checkpoint + config.json at ``out_dir``."""
    config_path = out_dir / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("m2cache_synth") == asdict(s):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shards = [("embed", lambda: {"model.embed_tokens.weight": (torch.randn(s.vocab, s.hidden, generator=g) * 0.02).half()})]
    shards += [(f"layer{i:03d}", lambda i=i: _layer_tensors(s, i, g)) for i in range(s.num_layers)]
    shards.append(("head", lambda: {"model.norm.weight": torch.ones(s.hidden, dtype=torch.float16),
                                    "lm_head.weight": (torch.randn(s.vocab, s.hidden, generator=g) * 0.02).half()}))
    for tag, make in shards:
        fname = f"model-{tag}.safetensors"
        tensors = make()
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        log.info("wrote %s", fname)
    total = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config_path.write_text(json.dumps({**s.hf_config(), "m2cache_synth": asdict(s)}, indent=1))  # last: marks complete
    return out_dir


def build_store(hf_dir: Path, store_dir: Path) -> Path:
    """Convert ``hf_dir`` once (reused while the checkpoint's config is unchanged)."""
    from m2cache.convert.writer import convert

    stamp = store_dir / "m2cache-bench-source.json"
    config = (hf_dir / "config.json").read_text()
    if (store_dir / "neurons.bin").is_file() and stamp.is_file() and stamp.read_text() == config:  # format 2
        return store_dir
    convert(hf_dir, store_dir, force=True, progress=False)
    stamp.write_text(config)
    return store_dir
