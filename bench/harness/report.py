"""Human-readable output of one run: the markdown table (docs/BENCHMARKS.md),
the perplexity table and trace line (real models / trace-driven mode), the
target lines, and two PNG plots (tokens/s vs budget; bytes per token per tier)."""
from __future__ import annotations

from pathlib import Path

MB = 1e6


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _budget(r: dict) -> str:
    if r["system"] in ("dense-reference", "transformers-dense"):
        return "100% (resident)"
    if r["system"] == "naive-streaming":
        return "0% (none)"
    if r["system"] == "llama.cpp":
        return "100% (mmap'd GGUF)"
    return f"{100 * r['fraction']:.0f}%"


def _peak_mib(r: dict) -> str:
    own = r.get("peak_rss_bytes", 0)
    services = sum((r.get("peak_rss_services_bytes") or {}).values())
    return f"{own / 2**20:.0f}" + (f" + {services / 2**20:.0f}" if services else "")


def table(doc: dict, model: str) -> str:
    """One row per configuration of ``model``."""
    head = ("| system | policy | fast-memory budget | decode tok/s | TTFT s | peak RSS MiB | HBM MB/tok | DRAM MB/tok "
            "| SSD MB/tok (% FFN) | device reads MB/tok | HBM hit | DRAM hit | limit tok/s (bound) | % of limit "
            "| limit via store reads tok/s | % of that |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in (x for x in doc["results"] if x["model"] == model):
        if "error" in r:
            rows.append(f"| {r['system']} | {r.get('policy', '')} | {_f(r.get('fraction'), '{:.0%}')} | failed: "
                        f"{r['error'][:80]} |" + " |" * 12)
            continue
        b = r["bytes_per_token"]
        rows.append(" | ".join([
            f"| {r['system']}", r["policy"], _budget(r), _f(r["decode_tok_s"], "{:.3f}"), _f(r["ttft_s"], "{:.1f}"),
            _peak_mib(r), _f(b["hbm"] / MB, "{:.1f}"), _f(b["dram"] / MB, "{:.1f}"),
            f"{b['ssd'] / MB:.1f} ({r['ssd_pct_of_ffn']:.1f}%)", _f(r["device_read_bytes_per_token"] / MB, "{:.1f}"),
            _f(r["hbm_hit_rate"], "{:.0%}"), _f(r["dram_hit_rate"], "{:.0%}"),
            f"{_f(r['limit_tok_s'], '{:.3f}')} ({r['bound_by'] or '-'})", _f(r["ratio_to_limit_tok_s"], "{:.0%}"),
            _f(r["limit_store_path_tok_s"], "{:.3f}"), _f(r["ratio_to_limit_store_path_tok_s"], "{:.0%}") + " |"]))
    return "\n".join(rows)


def bandwidth_lines(doc: dict) -> str:
    bw = doc["bandwidth"]
    return "\n".join([
        f"- SSD, store record reads (NeuronStore.get_neurons, cold, {bw['ssd_records']['how']}): "
        f"{bw['ssd_records']['bytes_per_s'] / MB:.0f} MB/s",
        f"- SSD, device sequential 1 MiB reads (cold): {bw['ssd_sequential']['bytes_per_s'] / MB:.0f} MB/s",
        f"- DRAM, Redis MGET of 64 FULL records: {bw['dram']['bytes_per_s'] / MB:.0f} MB/s",
        f"- fast memory (float32 sum): {bw['hbm']['bytes_per_s'] / MB:.0f} MB/s",
    ])


def quant_note(weights: str) -> str:
    """Next to every fidelity figure: a GGUF source's weights already are low-bit values."""
    if weights.startswith(("Q4", "IQ4", "Q3", "Q2", "IQ3", "IQ2")):
        return (f"its weights are dequantised {weights} values (about 4 bits or fewer), so INT4 is nearly free on "
                "it: INT4 and mixed-precision fidelity look better here than on a model with full-precision weights")
    if weights.startswith(("Q8", "Q6", "Q5")):
        return f"its weights are dequantised {weights} values, so INT8 is nearly free on it"
    return ""


def target_lines(doc: dict) -> str:
    lines = []
    for t in doc["targets"]:
        op = ">=" if t.get("at_least", True) else "<="
        if t["met"]:
            verdict = "met"
        elif t.get("at_least", True):
            verdict = f"MISSED by {t['goal'] / t['value']:.1f}x" if t["value"] > 0 else "MISSED"
        else:
            verdict = f"MISSED by {t['value'] / t['goal']:.1f}x"
        at = f" at {t.get('fraction', 0.25):.0%}" if t.get("fraction", 0.25) is not None else ""
        lines.append(f"- [{t['policy']}] {t['target']}{at}: {t['value']:.3g} (target {op} {t['goal']:g}): {verdict}")
    note = quant_note(doc.get("main_model_weights") or "")
    for f in doc["fidelity"]:
        lines.append(f"- fidelity {f['model']} {f['system']} ({f.get('policy', 'full')}, 100%): "
                     + ("tokens identical to the dense reference" if f["identical"]
                        else f"differs from the dense reference at token {f['first_mismatch']}")
                     + (f" ({note})" if note and f["model"] == doc.get("main_model") else ""))
    return "\n".join(lines)


def perplexity_table(doc: dict) -> str:
    rows = doc.get("perplexity") or []
    if not rows:
        return ""
    note = quant_note(doc.get("main_model_weights") or "")
    out = [f"Held-out perplexity of {doc['main_model']} per policy (same at every budget: caches never change "
           f"results){'; ' + note if note else ''}:", "",
           "| policy | neurons kept | perplexity | tokens (context) | chosen by |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r.get('policy', '?')} | - | failed: {r['error'][:80]} | - | - |")
            continue
        out.append(f"| {r['policy']} | {r['kept_fraction']:.0%} | {r['perplexity']:.3f} | "
                   f"{r['tokens']} ({r['context']}) | {r['chooser']} |")
    return "\n".join(out)


def policy_lines(doc: dict, model: str) -> str:
    """Who chose the neurons in each m2cache policy of the table."""
    seen = {}
    for r in doc["results"]:
        if r["model"] == model and r.get("predictor") and r.get("policy") not in seen:
            seen[r["policy"]] = r["predictor"]
    return "Policies: full = every neuron at FULL precision" + "".join(
        f"; {p} = {src}" for p, src in seen.items()) + "."


def trace_lines(doc: dict) -> str:
    t = doc.get("trace")
    if not t:
        return ""
    if "error" in t:
        return f"Trace-driven mode: recording failed: {t['error']}"
    loc = t["locality"]
    return (f"Trace-driven policy: {t['chooser']} choices of {t['source']} recorded on {t['tokens']} tokens of "
            f"{t['text']} (band ratios {t['ratios']}, its perplexity under them {t['perplexity']:.3f}), replayed on "
            f"the synthetic model with layers and neuron ids mapped proportionally. In the trace, "
            f"{loc['reuse_in_window']:.1%} of a token's kept neurons were kept by one of the previous "
            f"{loc['window']} tokens ({loc['kept_fraction']:.0%} of each layer kept)"
            + (f", {loc['same_band_reuse_in_window']:.1%} in the same precision band" if
               "same_band_reuse_in_window" in loc else "") + ".")


def plots(doc: dict, model: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in doc["results"] if r["model"] == model and "error" not in r]
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    series: dict[str, list] = {}
    for r in rs:
        name = r["system"] + ("" if r["policy"] == "full" else f" ({r['policy']})")
        series.setdefault(name, []).append((100 * (r.get("fraction") or 0), r["decode_tok_s"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        xs, ys = zip(*pts)
        if len(pts) == 1 and name.startswith(("dense", "transformers", "llama.cpp")):
            ax.axhline(ys[0], ls="--" if not name.startswith("llama") else ":", lw=1, label=f"{name} (resident)",
                       color={"d": "gray", "t": "black", "l": "tab:purple"}[name[0]])
        else:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("fast-memory budget (% of FFN bytes)")
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title(f"{model}: decode speed vs fast-memory budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    speed = out_dir / "bench_tokens_per_s.png"
    fig.savefig(speed)
    plt.close(fig)
    return [speed, _bytes_plot(rs, model, out_dir, plt)]


def _bytes_plot(rs: list[dict], model: str, out_dir: Path, plt) -> Path:
    short = {"full": "", "mixed": "+mx", "int4": "+int4", "oracle": "+oracle", "trace-driven": "+trace"}
    labels = [f"{r['system'].replace('m2cache-', 'm2c-')}{short.get(r['policy'], ' ' + r['policy'])} "
              f"{_budget(r).split()[0]}" for r in rs]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    bottom = [0.0] * len(rs)
    for tier, color in (("hbm", "tab:green"), ("dram", "tab:orange"), ("ssd", "tab:red")):
        vals = [r["bytes_per_token"][tier] / MB for r in rs]
        ax.bar(range(len(rs)), vals, bottom=bottom, label=tier.upper(), color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rs)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MB read per decoded token")
    ax.set_title(f"{model}: bytes per token by tier")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "bench_bytes_per_token.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(doc: dict) -> str:
    model = doc.get("main_model") or (doc["results"][0]["model"] if doc["results"] else "")
    others = sorted({r["model"] for r in doc["results"]} - {model})
    parts = [table(doc, model), "", policy_lines(doc, model), ""]
    for extra in (trace_lines(doc), perplexity_table(doc)):
        if extra:
            parts += [extra, ""]
    parts += ["Tier bandwidths measured in the same run:", bandwidth_lines(doc), "",
              "Targets and fidelity:", target_lines(doc)]
    for name in others:
        parts += ["", f"Fidelity model {name}:", "", table(doc, name)]
    la = doc["load_avg"]
    parts += ["", f"Load average at start {la['start'][0]:.2f} / end {la['end'][0]:.2f}; run took {doc['wall_s']:.0f} s."]
    return "\n".join(parts)


def write_all(doc: dict, out_dir: Path) -> None:
    text = markdown(doc)
    (out_dir / "results.md").write_text(text + "\n")
    model = doc.get("main_model") or (doc["results"][0]["model"] if doc["results"] else "")
    doc["plots"] = [str(p) for p in plots(doc, model, out_dir)] if model else []
    print(text)
