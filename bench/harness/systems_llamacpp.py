"""llama.cpp as a peer (llama-cpp-python): what a CPU user with a GGUF picks today.

The model is memory-mapped (llama.cpp's default): its weights are file pages,
so under the bench's cgroup memory limit (anonymous memory + headroom, the same
rule as every system with an SSD tier) the kernel may evict them and the
"device reads" column shows what was fetched again. Greedy (temperature 0),
``threads`` threads for decode and prefill, CPU only.

Built for this CPU without native tuning (a native build dies with SIGILL at
load on this machine); see docs/BENCHMARKS.md for the exact build command.
"""
from __future__ import annotations

from pathlib import Path

from bench.harness import gguf_export


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, gguf_path: Path, threads: int = 2, n_ctx: int = 512, stop_at_eos: bool = True):
        from llama_cpp import Llama, __version__

        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_gpu_layers=0, use_mmap=True, use_mlock=False, seed=0, verbose=False)
        self.eos = {self.llm.token_eos()} if stop_at_eos else set()
        self.ffn_bytes = gguf_export.ffn_bytes(gguf_path)
        self.tokens_done = 0
        self.info = {"gguf": str(gguf_path), "weights": gguf_export.quant_label(gguf_path), "threads": threads,
                     "llama_cpp_python": __version__, "ffn_resident_bytes": self.ffn_bytes, "mmap": True}

    def generate(self, prompt_ids: list[int], n_new: int, on_token) -> list[int]:
        """Greedy, stopping after ``n_new`` tokens or at (and including) EOS, as the other systems do
        (on real models: the synthetic model's placeholder EOS is just another token)."""
        out: list[int] = []
        for token in self.llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                       reset=True):
            out.append(int(token))
            self.tokens_done += 1
            on_token(len(out) - 1, out[-1])
            if len(out) >= n_new or out[-1] in self.eos:
                break
        return out

    def counters(self) -> dict:
        return {"hbm_bytes": self.ffn_bytes * self.tokens_done}

    def close(self) -> None:
        self.llm.close()
