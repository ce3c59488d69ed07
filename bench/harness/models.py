"""The models a bench run measures, each prepared once under the out dir and
reused while its source is unchanged:

- the synthetic wide model (bench/harness/synth.py), the default;
- ``--model DIR_OR_GGUF``: any checkpoint. Converted into a store (a GGUF at the
  converter's default fp16). A GGUF also gets a Hugging Face directory for the
  transformers and Accelerate peers (transformers reads the GGUF and saves it
  as fp16 safetensors: the same values as the store) and, for llama.cpp, the
  file itself plus an F16 copy (bench/harness/gguf_export.py);
- the real tiny models, run at 100% FULL only (fidelity).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness.synth import SynthShape, build_checkpoint, build_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchModel:
    name: str  # the store's name under out_dir/stores
    hf_dir: Path | None  # for transformers / Accelerate (None: those peers are skipped)
    fidelity_only: bool = False
    ggufs: dict[str, Path] = field(default_factory=dict)  # weights label ("F16", "Q4_1") -> file, for llama.cpp
    real: bool = False  # a pretrained model (tokenizer, perplexity, oracle policy)
    source_weights: str = ""  # a GGUF's weight type ("Q4_1"): what its dequantised values came from


def slug(name: str) -> str:
    """"SmolLM2-135M-Instruct.Q4_1" -> "smollm2-135m-instruct-q4-1"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def synthetic(shape: SynthShape, out_dir: Path, llamacpp: bool = False) -> BenchModel:
    """The synthetic checkpoint and store; with ``llamacpp`` also its F16 GGUF and llama.cpp's
    own Q4_1 quantisation of it (when llama-cpp-python is installed)."""
    import importlib.util

    hf = build_checkpoint(shape, out_dir / "models" / shape.name)
    build_store(hf, out_dir / "stores" / shape.name)
    ggufs = {}
    if llamacpp and importlib.util.find_spec("llama_cpp") is not None:
        from bench.harness.gguf_export import f16_from_hf, q4_1_with_llamacpp

        print(f"  GGUF copies of {shape.name} for llama.cpp", flush=True)
        ggufs["F16"] = f16_from_hf(hf, out_dir / "models" / f"{shape.name}.F16.gguf")
        ggufs["Q4_1"] = q4_1_with_llamacpp(ggufs["F16"], out_dir / "models" / f"{shape.name}.Q4_1.gguf")
    return BenchModel(shape.name, hf, ggufs=ggufs)


def fidelity(name: str, shared_models: Path, out_dir: Path) -> BenchModel | None:
    src = shared_models / name
    if not (src / "config.json").is_file():
        log.warning("fidelity model %s not found under %s", name, shared_models)
        return None
    build_store(src, out_dir / "stores" / name)
    return BenchModel(name, src, fidelity_only=True)


def checkpoint(source: Path, out_dir: Path, peers: bool = True) -> BenchModel:
    """A real checkpoint (HF directory or GGUF file) prepared for every peer (only its store without ``peers``)."""
    from m2cache.convert.gguf import is_gguf

    source = Path(source).resolve()
    gguf = is_gguf(source)
    name = slug(source.stem if gguf else source.name)
    _store_once(source, out_dir / "stores" / name)
    if not gguf or not peers:
        return BenchModel(name, source if not gguf else None, real=True)
    from bench.harness.gguf_export import f16_from_gguf, quant_label

    hf = _hf_from_gguf(source, out_dir / "models" / f"{name}-hf")
    weights = quant_label(source)
    ggufs = {weights: source}
    if "F16" not in ggufs:
        ggufs["F16"] = f16_from_gguf(source, out_dir / "models" / f"{name}.F16.gguf")
    return BenchModel(name, hf, ggufs=ggufs, real=True, source_weights=weights)


def _stamp(source: Path) -> str:
    st = source.stat()
    return json.dumps({"source": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def _store_once(source: Path, store_dir: Path) -> Path:
    from m2cache.convert.writer import convert

    stamp = store_dir / "m2cache-bench-source.json"
    if (store_dir / "data.mdb").is_file() and stamp.is_file() and stamp.read_text() == _stamp(source):
        return store_dir
    print(f"  converting {source} -> {store_dir}", flush=True)
    convert(source, store_dir, force=True, progress=False)
    stamp.write_text(_stamp(source))
    return store_dir


def _hf_from_gguf(source: Path, hf_dir: Path) -> Path:
    """transformers reads the GGUF (dequantised, float32) and the same weights are saved as
    fp16 safetensors + config, once. transformers 5 refuses ``save_pretrained`` (and ``half``)
    on a model loaded from a GGUF, so its weights move into a plain model of the same config."""
    stamp = hf_dir / "m2cache-bench-source.json"
    if stamp.is_file() and stamp.read_text() == _stamp(source):
        return hf_dir
    import torch
    import transformers

    print(f"  writing a Hugging Face copy of {source.name} for the transformers/Accelerate peers", flush=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                               dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict({k: v.to(torch.float16) for k, v in loaded.state_dict().items()})
    del loaded
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{hf_dir.name}-", dir=hf_dir.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / "m2cache-bench-source.json").write_text(_stamp(source))
        shutil.rmtree(hf_dir, ignore_errors=True)
        tmp.rename(hf_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hf_dir
