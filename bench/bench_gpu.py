"""Short decode benchmark on the GPU (scripts/gpu_check.sh), side by side in one run:
transformers dense, m2cache's dense path, m2cache mixed precision with every precision
resident, and mixed at a 25% budget, on the synthetic fp16 Llama-shape model.
On CUDA m2cache's sparse FFN runs the torch fallback (records gathered and decoded per
step): no CUDA kernel exists yet, so the mixed rows measure that fallback.

    python bench/bench_gpu.py [--layers 8] [--tokens 16] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def decode_rate(generate, prompt, n_new: int, device) -> float:
    """Median decode tokens/s of one greedy generation (after its first two tokens)."""
    times: list[float] = []

    def on_token(_tok):
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    generate(prompt, n_new, on_token)
    gaps = sorted(b - a for a, b in zip(times[2:], times[3:]))
    return 1.0 / gaps[len(gaps) // 2]


def main() -> None:
    from bench.harness.policy import random_predictor
    from bench.harness.synth import SynthShape, build_checkpoint, build_store
    from bench.harness.systems_local import all_resident_fraction
    from m2cache.local.loader import load_model, store_fetch
    from m2cache.model.generate import generate
    from m2cache.predictors.bands import BandRatios
    from m2cache.predictors.ranking import Ranker
    from m2cache.store.reader import NeuronStore
    from m2cache.worker.provider import CachedProvider, DenseProvider
    from m2cache.worker.runtime import build_cache, dense_layers
    import transformers

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/m2c-gpu-bench"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SynthShape(num_layers=args.layers)
    hf = build_checkpoint(shape, args.out_dir / "hf")
    store = NeuronStore(build_store(hf, args.out_dir / "store"))
    m = store.manifest
    model, _tok, _bank = load_model(store, device)
    prompt = [1] + [(7919 * i + 13) % (shape.vocab - 3) + 3 for i in range(1, 8)]
    fetch = store_fetch(store)
    ratios = BandRatios(0.2, 0.25, 0.25)
    choose = Ranker(random_predictor(m).to(device), ratios).choose()
    results = {}

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float16).to(device).eval()

    def hf_generate(ids, n, on_token):
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:
                    self.first = False
                    return
                on_token(value)

            def end(self):
                pass

        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              streamer=Clock(), pad_token_id=0)

    results["transformers dense fp16"] = decode_rate(hf_generate, prompt, args.tokens, device)
    del hf_model

    dense = DenseProvider(dense_layers(m, fetch, model.dtype, device))
    results["m2cache dense path"] = decode_rate(
        lambda ids, n, cb: generate(model, ids, n, dense, on_token=cb), prompt, args.tokens, device)
    del dense
    for label, fraction in (("m2cache mixed, all precisions resident", all_resident_fraction(m, ratios.to_dict())),
                            ("m2cache mixed, 25% budget", 0.25)):
        cache = build_cache(m, fraction, ratios.to_dict(), window=4, device=str(device))
        if cache.holds_everything:
            cache.fill(lambda layer, prec, ids: fetch(layer, prec, ids, layer))
        provider = CachedProvider(cache, m.layout, fetch, m.num_layers)
        results[label] = decode_rate(lambda ids, n, cb: generate(model, ids, n, provider, on_token=cb,
                                                                 before_step=lambda: provider.begin_step([choose])),
                                     prompt, args.tokens, device)
        provider.close()
        del cache
    base = results["transformers dense fp16"]
    doc = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": shape.name,
           "decode_tok_s": results, "ratio_to_transformers": {k: v / base for k, v in results.items()},
           }
    for k, v in results.items():
        print(f"{k:42s} {v:8.2f} tok/s  {v / base:5.2f}x transformers")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    store.close()


if __name__ == "__main__":
    main()
