"""Tables and plots of plans (``m2cache plan``)."""
from __future__ import annotations

from pathlib import Path

GB = 1e9


def _g(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}g}" if v < 10 ** digits else f"{v:,.0f}"


def plan_table(rows: list[dict]) -> str:
    """Markdown, one row per plan (``Plan.row()``)."""
    bench = any("bench_config" in r for r in rows)
    head = ("| hardware | model | policy | " + ("bench configuration (bytes/token shares) | " if bench else "")
            + "HBM cache GB (hit) | DRAM / CXL GB | decode tok/s | TTFT s | bound | W | tok/J | gCO2/token | tok/$ |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pl = r["placement"]
        lower = pl["lower_bytes"]
        hit = r["hbm_hit_rate"]
        out.append(" | ".join([
            f"| {r['profile']}", r["model"], r["policy"], *([r.get("bench_config", "")] if bench else []),
            f"{pl['cache_bytes'] / GB:.1f} ({'-' if hit is None else f'{hit:.0%}'})",
            f"{lower.get('dram', 0) / GB:.0f} / {lower.get('cxl', 0) / GB:.0f}",
            _g(r["tok_s"]), _g(r["ttft_s"], 2), r["bound"], f"{r['power_w']:.0f}", _g(r["tok_per_joule"]),
            _g(r["gco2_per_token"]), _g(r["tok_per_dollar"]) + " |"]))
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> Path:
    """tok/s, tok/J and tok/$ of the best plan per (hardware, model), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["profile"], r["model"])
        if key not in best or r["tok_s"] > best[key]["tok_s"]:
            best[key] = r
    hardware = list(dict.fromkeys(k[0] for k in best))
    models = list(dict.fromkeys(k[1] for k in best))
    metrics = (("tok_s", "decode tokens/s"), ("tok_per_joule", "tokens per joule"), ("tok_per_dollar", "tokens per $"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    width = 0.8 / max(len(models), 1)
    for ax, (key, title) in zip(axes, metrics):
        for j, model in enumerate(models):
            xs = [i + j * width for i in range(len(hardware))]
            ys = [best.get((h, model), {}).get(key, 0) for h in hardware]
            ax.bar(xs, ys, width, label=model)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(hardware))], hardware, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("m2cache plan: best placement per hardware profile (batch 1)")
    return _save(fig, path)


def validation_plot(doc: dict, path: Path) -> Path:
    """Predicted vs measured decode tok/s, one point per configuration, with the tolerance band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["configurations"] if "failed" not in r]
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = [r for r in rows if r["system"] == system]
        ax.scatter([r["measured_tok_s"] for r in pts], [r["predicted_tok_s"] for r in pts], label=system, s=22)
    if rows:
        lo = min(min(r["measured_tok_s"], r["predicted_tok_s"]) for r in rows) * 0.7
        hi = max(max(r["measured_tok_s"], r["predicted_tok_s"]) for r in rows) * 1.4
        t = doc["tolerance"]
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * (1 - t), hi * (1 - t)], [lo * (1 + t), hi * (1 + t)], color="0.85", zorder=0)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured decode tok/s (m2cache bench)")
    ax.set_ylabel("predicted decode tok/s (m2cache plan)")
    ax.set_title(f"this machine, +/-{doc['tolerance']:.0%} band")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
