"""Small GGUF files for the tests, written with gguf.GGUFWriter the way llama.cpp's
convert_hf_to_gguf.py writes them: a tiny random-init transformers model (llama,
mistral or qwen2), HF names mapped to GGUF names, q/k rows permuted for the llama
architecture, 2-D weights quantised, norms in F32, a small byte-level BPE tokenizer
with special tokens and a chat template.

Quantisation: F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 through the gguf package's own
quantisers. The package cannot quantise K-quants (only dequantise them), so K-quant
tensors are random blocks with their scale fields set small: a valid file whose
values are whatever those blocks dequantise to (the tests compare against
transformers loading the same file, not against the source model).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MERGES = ["Ġ t", "h e", "Ġt he", "o n"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
VOCAB = 256 + len(MERGES) + len(SPECIAL)  # 264
BOS, EOS, PAD, UNK = 261, 262, 263, 260  # <|im_start|>, <|im_end|>, <pad>, <|endoftext|>

# HF name part -> GGUF name part (inverse of m2cache.convert.gguf's maps)
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
         "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
         "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
# K-quant block layouts: byte offsets of the fp16 scale fields (d, and dmin where present)
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
K_SCALE = {"Q2_K": 4e-4, "Q3_K": 1e-4, "Q4_K": 2e-5, "Q5_K": 1e-5, "Q6_K": 5e-6}  # keeps |w| around 0.02


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """Widths divisible by 256 so K-quant rows fit whole blocks."""
    common = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS)
    common.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    if family == "mistral":
        common.setdefault("sliding_window", None)
    if family == "qwen2":
        common.setdefault("tie_word_embeddings", False)
    return cls(**common)


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb every tensor
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.float().eval()


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rows [h, 2, D/2] -> [h, D/2, 2])."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def k_quant_blocks(shape: tuple[int, int], qtype, rng: np.random.Generator) -> np.ndarray:
    """Random valid K-quant data for a [rows, cols] tensor -> uint8 [rows, row_bytes]."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scale = np.full(blocks.shape[0], K_SCALE[qtype.name], dtype=np.float16).view(np.uint8).reshape(-1, 2)
    for off in K_SCALE_OFFSETS[qtype.name]:
        blocks[:, off : off + 2] = scale
    return blocks.reshape(rows, cols // block * size)


def encode(w: np.ndarray, qtype, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """(data for GGUFWriter.add_tensor, raw_dtype or None)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if w.ndim == 1 or qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype.name in K_SCALE_OFFSETS:
        return k_quant_blocks(w.shape, qtype, rng), qtype
    return quantize(w.astype(np.float32), qtype), qtype


def write_gguf(path: Path, model, arch: str = "llama", qtype: str = "Q8_0", *, name: str = "tiny test model",
               tokenizer: bool = True, skip: tuple[str, ...] = (), extra_tensors: dict | None = None,
               kv: dict | None = None, seed: int = 0, embed_qtype: str | None = None, encoder=None) -> Path:
    """Write ``model`` (a transformers llama/mistral/qwen2 model) as a GGUF file.

    ``arch``: the GGUF architecture string (Mistral models use "llama", as llama.cpp does);
    ``skip``: GGUF tensor names left out; ``extra_tensors``: GGUF name -> float32 array
    added; ``kv``: extra string/int metadata (overrides); ``encoder``: replaces ``encode``."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype]
    eqt = gguf.GGMLQuantizationType[embed_qtype or qtype]
    rng = np.random.default_rng(seed)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_vocab_size(c.vocab_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if tokenizer:
        _add_tokenizer(w)
    for key, value in (kv or {}).items():
        (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf, arr in state.items():
        name_ = _gguf_name(hf)
        if name_ in skip:
            continue
        if arch == "llama" and ".q_proj." in hf:
            arr = llamacpp_permute(arr, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf:
            arr = llamacpp_permute(arr, c.num_key_value_heads)
        data, raw = (encoder or encode)(arr, eqt if name_ in ("token_embd.weight", "output.weight") else qt, rng)
        w.add_tensor(name_, data, raw_dtype=raw)
    for name_, arr in (extra_tensors or {}).items():
        w.add_tensor(name_, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_name(hf: str) -> str:
    if hf in TOP:
        return TOP[hf]
    layer, part = hf.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{LAYER[part]}"


def _add_tokenizer(w) -> None:
    b2u = bytes_to_unicode()
    tokens = [b2u[i] for i in range(256)] + [m.replace(" ", "") for m in MERGES] + SPECIAL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (256 + len(MERGES)) + [3] * len(SPECIAL))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_pad_token_id(PAD)
    w.add_unk_token_id(UNK)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
