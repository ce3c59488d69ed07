"""The peers, through Hugging Face's own code paths:

- ``TransformersDense``: ``AutoModelForCausalLM`` fully resident, ``generate``;
- ``AccelerateOffload``: big-model inference, ``device_map="auto"`` with
  ``max_memory`` below the model and ``offload_folder`` on disk; every
  offloaded weight is read from disk at every forward (safetensors checkpoints
  are read in place, so the "folder" is the checkpoint itself).

Both run in the checkpoint's dtype (``dtype="auto"``) and time tokens with a
streamer. SSD bytes per token = bytes of the parameters placed on "disk".
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers.generation.streamers import BaseStreamer


class _Clock(BaseStreamer):
    """Calls ``on_token(i, id)`` as ``generate`` emits each new token (the first put is the prompt)."""

    def __init__(self, on_token):
        self.on_token = on_token
        self.seen_prompt = False
        self.count = 0

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for tok in value.reshape(-1).tolist():
            self.on_token(self.count, int(tok))
            self.count += 1

    def end(self):
        pass


def _hf_generate(model, prompt_ids, n_new, on_token) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                             do_sample=False, streamer=_Clock(on_token), pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def _param_bytes(model, prefix: str = "") -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(prefix))


class _HFSystem:
    """A transformers model generating with a per-token callback; subclasses set
    ``self.model`` and report their bytes in ``counters``."""

    model = None
    tokens_done = 0

    def generate(self, prompt_ids, n_new, on_token):
        def count(i, tok):
            self.tokens_done += 1
            on_token(i, tok)
        return _hf_generate(self.model, prompt_ids, n_new, count)

    def close(self):
        del self.model


class TransformersDense(_HFSystem):
    name = "transformers-dense"

    def __init__(self, hf_dir: Path):
        self.model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto").eval()
        self.tokens_done = 0
        self.ffn_bytes = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if ".mlp." in n)
        self.info = {"compute_dtype": str(self.model.dtype).removeprefix("torch."), "ffn_resident_bytes": self.ffn_bytes}

    def counters(self) -> dict:
        return {"hbm_bytes": self.ffn_bytes * self.tokens_done}



def _disk_bytes(hf_dir: Path, device_map: dict, dtype) -> int:
    """Bytes of every parameter whose module Accelerate placed on "disk"."""
    from safetensors import safe_open

    disk = [m for m, d in device_map.items() if d == "disk"]
    total = 0
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if any(name == m or name.startswith(m + ".") for m in disk):
                    shape = st.get_slice(name).get_shape()
                    total += int(torch.tensor(shape).prod()) * torch.finfo(dtype).bits // 8
    return total


class AccelerateOffload(_HFSystem):
    name = "accelerate-offload"

    def __init__(self, hf_dir: Path, max_memory_bytes: int, offload_dir: Path):
        offload_dir.mkdir(parents=True, exist_ok=True)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype="auto", device_map="auto", max_memory={"cpu": int(max_memory_bytes)},
            offload_folder=str(offload_dir)).eval()
        device_map = dict(self.model.hf_device_map)
        self.disk_bytes = _disk_bytes(Path(hf_dir), device_map, self.model.dtype)
        self.tokens_done = 0
        self.info = {"max_memory_bytes": int(max_memory_bytes), "disk_param_bytes": self.disk_bytes,
                     "device_map": {k: str(v) for k, v in device_map.items()},
                     "compute_dtype": str(self.model.dtype).removeprefix("torch.")}

    def counters(self) -> dict:
        return {"ssd_bytes": self.disk_bytes * self.tokens_done}

