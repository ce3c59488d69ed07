"""Ranker benchmark: predictor kinds side by side at equal cost (top-k recall
vs oracle vs random, cost as % of the layer's FFN), look-ahead recall, and
held-out perplexity of dense vs oracle-sparse vs predictor-sparse decoding,
FULL-only and mixed precision at the same byte budget and split.

Texts per model: train (predictor fitting), calib (ratio search), eval (every
reported number; never trained or tuned on). Defaults: TinyStories
train_2316 / valid_000-499_calib / valid_500-999_eval; ``--wikitext`` cuts
WikiText-2's test split by line into train [0, 60%), calib [60%, 70%) and
eval [70%, 100%) (for SmolLM2). A model is a name under ../shared/models, an
HF directory or an existing store (copied; the original is never written).

    python bench/bench_ranker.py [--models tinystories-656k stories260k] [--json out.json]
    python bench/bench_ranker.py --models /work/cache/stores/smollm2-135m --wikitext --budgets 0.25 ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from m2cache.codec.format import Precision
from m2cache.convert.writer import convert
from m2cache.local.loader import load_model
from m2cache.model.providers import ChoiceProvider, FullProvider, uniform_choose
from m2cache.predictors import budget as budget_mod
from m2cache.predictors import storage
from m2cache.predictors.bands import BandRatios, full_only
from m2cache.predictors.collect import collect_ffn_inputs, full_weights, tokenize
from m2cache.predictors.evaluate import stepwise_score
from m2cache.predictors.pipeline import SearchJob, TrainJob, open_store, run_search, train_on_inputs
from m2cache.predictors.quality import ahead_recalls, layer_recalls, standard_rankers
from m2cache.predictors.ranking import Ranker, oracle_choose

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY = SHARED / "corpora" / "tinystories"
WIKI = SHARED / "corpora" / "wikitext2" / "wiki.test.raw"
FRACS = (0.1, 0.25, 0.5)


def texts(args) -> dict[str, str]:
    if args.wikitext:
        lines = WIKI.read_text(encoding="utf-8").splitlines(keepends=True)
        cut = lambda a, b: "".join(lines[int(a * len(lines)) : int(b * len(lines))])  # noqa: E731
        return {"train": cut(0, 0.6), "calib": cut(0.6, 0.7), "eval": cut(0.7, 1.0),
                "names": "wiki.test.raw lines [0,60%) / [60,70%) / [70,100%)"}
    return {"train": (TINY / "train_2316.txt").read_text(), "calib": (TINY / "valid_000-499_calib.txt").read_text(),
            "eval": (TINY / "valid_500-999_eval.txt").read_text(),
            "names": "train_2316.txt / valid_000-499_calib.txt / valid_500-999_eval.txt"}


def make_store(model: str, workdir: Path) -> Path:
    src = Path(model) if Path(model).exists() else SHARED / "models" / model
    dst = workdir / src.name
    if (src / "data.mdb").is_file():
        shutil.copytree(src, dst)
    else:
        convert(src, dst, progress=False)
    return dst


def kind_rows(name, inputs_tr, inputs_ev, bank, m, layout, args) -> tuple[dict, dict]:
    """Train every kind at --cost on the same inputs; recall + cost per kind."""
    ffn_b, ffn_f = budget_mod.ffn_bytes(layout, m.d_ffn), budget_mod.ffn_flops(m.d_model, m.d_ffn, m.ffn_kind)
    weights = lambda layer: full_weights(bank, layer)  # noqa: E731
    out, predictors = {}, {}
    for kind in args.kinds:
        gate_kinds = ("gateup", "gatecopy4", "gatecopy8", "qcopy")
        if (m.ffn_kind == "relu" and kind in gate_kinds) or (m.ffn_kind == "swiglu" and kind == "fc1"):
            continue  # the kind does not fit this FFN
        cost = args.cost
        least = {"gatecopy4": 0, "gatecopy8": 0, "qcopy": 1}.get(kind)
        if least is not None and budget_mod.largest_rank(kind, m.d_model, m.d_ffn, cost * ffn_b) < least:
            cost = budget_mod.bytes_for(kind, m.d_model, m.d_ffn, least) / ffn_b  # does not fit: at its least cost
        job = TrainJob("", kind=kind, cost=cost, epochs=args.epochs, device=args.device)
        t = time.perf_counter()
        p = train_on_inputs(inputs_tr, bank, m, layout, job)
        train_s = time.perf_counter() - t
        rec = layer_recalls(inputs_ev, weights, m.ffn_kind, standard_rankers(p), FRACS)
        c = p.cost(ffn_b, ffn_f)
        out[kind] = {"rank": p.ranks()[0], "bytes_per_layer": c["bytes"], "bytes_frac": c["bytes_frac"],
                     "flops_frac": c["flops_frac"], "train_s": train_s,
                     "recall": rec["predictor"], "oracle": rec["oracle"], "random": rec["random"],
                     "recall_mean": [sum(r[i] for r in rec["predictor"]) / m.num_layers for i in range(len(FRACS))],
                     "recall25_min": min(r[1] for r in rec["predictor"])}
        predictors[kind] = p
        print(f"  {name} {kind}: rank {p.ranks()[0]}, {100 * c['bytes_frac']:.2f}% bytes, recall@25 "
              f"{out[kind]['recall_mean'][1]:.3f} (train {train_s:.0f} s)", flush=True)
    return out, predictors


def ahead_row(inputs_tr, inputs_ev, bank, m, layout, kind, args) -> dict:
    """Look-ahead recall: trained ahead scorers (--ahead-cost) vs layer l+1's own scorer on x_l."""
    if m.num_layers < 2:
        return {}
    weights = lambda layer: full_weights(bank, layer)  # noqa: E731
    job = TrainJob("", kind=kind, cost=args.cost, ahead_cost=args.ahead_cost, epochs=args.epochs, device=args.device)
    p = train_on_inputs(inputs_tr, bank, m, layout, job)
    trained = ahead_recalls(inputs_ev, weights, m.ffn_kind, p, FRACS)
    ahead = p.ahead
    p.ahead = {}
    reuse = ahead_recalls(inputs_ev, weights, m.ffn_kind, p, FRACS)
    p.ahead = ahead
    c = p.cost(budget_mod.ffn_bytes(layout, m.d_ffn), budget_mod.ffn_flops(m.d_model, m.d_ffn, m.ffn_kind))
    return {"kind": p.meta["ahead_kind"], "rank": p.ahead[1].rank, "bytes_frac": c["ahead_bytes_frac"],
            "trained": trained, "reuse_next_layer_scorer": reuse}


def ppl_rows(store, model, tok, bank, predictors: dict, mixed: dict, args, eval_text) -> list[dict]:
    seqs = tokenize(tok, eval_text, 128, args.ppl_tokens, model.config.bos_token_id)
    layout, kind = store.layout, store.manifest.ffn_kind

    def ppl(choose) -> float:
        return stepwise_score(model, seqs, ChoiceProvider(bank, choose)).perplexity

    dense = stepwise_score(model, seqs, FullProvider(bank)).perplexity
    rows = [{"setting": "dense FULL", "ratios": BandRatios(1, 0, 0).to_dict(), "bytes": 1.0, "oracle": dense}]
    for prec, label in ((Precision.INT8, "dense INT8"), (Precision.INT4, "dense INT4")):
        r = BandRatios(0, 1, 0) if prec == Precision.INT8 else BandRatios(0, 0, 1)
        rows.append({"setting": label, "ratios": r.to_dict(), "bytes": r.byte_fraction(layout),
                     "oracle": ppl(uniform_choose(bank, prec))})
    for budget in args.budgets:
        settings = [(f"{budget:.0%} budget, mixed", mixed[budget])]
        if not args.no_full_only:
            settings.insert(0, (f"{budget:.0%} FULL only", full_only(budget)))
        for label, ratios in settings:
            row = {"setting": label, "ratios": ratios.to_dict(), "bytes": ratios.byte_fraction(layout),
                   "oracle": ppl(oracle_choose(bank, kind, ratios)), "predictor": {}}
            for name, p in predictors.items():
                row["predictor"][name] = ppl(Ranker(p).choose(ratios))
            rows.append(row)
            print(f"  {label}: oracle {row['oracle']:.3f} " +
                  " ".join(f"{k} {v:.3f}" for k, v in row["predictor"].items()), flush=True)
    return rows


def bench_model(model_name: str, workdir: Path, args) -> dict:
    tx = texts(args)
    store_dir = make_store(model_name, workdir)
    with open_store(store_dir) as store:
        m, layout = store.manifest, store.layout
        model, tok, bank = load_model(store, args.device)
        seq_len = min(256, model.config.max_position_embeddings)
        t0 = time.perf_counter()
        tr = collect_ffn_inputs(model, FullProvider(bank), tokenize(tok, tx["train"], seq_len, args.train_tokens,
                                                                    model.config.bos_token_id))
        collect_s = time.perf_counter() - t0
        ev = collect_ffn_inputs(model, FullProvider(bank), tokenize(tok, tx["eval"], seq_len, args.recall_tokens,
                                                                    model.config.bos_token_id))
        t0 = time.perf_counter()
        default = train_on_inputs(tr, bank, m, layout, TrainJob("", cost=args.cost, epochs=args.epochs, device=args.device))
        default_train_s = time.perf_counter() - t0
        kinds, predictors = kind_rows(Path(model_name).name, tr, ev, bank, m, layout, args)
        ahead = ahead_row(tr, ev, bank, m, layout, default.meta["kind"], args) if args.ahead_cost else {}
    storage.save_predictor(store_dir, default, default.meta)
    mixed = {}
    for budget in args.budgets:  # M2Cache Algorithm 1 with the default predictor, as `m2cache search-policy` runs it
        policy = run_search(store_dir, SearchJob(tx["calib"], budget, args.step, "ppl", args.search_tokens, args.device))
        mixed[budget] = BandRatios.from_dict(policy["ratios"])
    with open_store(store_dir) as store:
        model, tok, bank = load_model(store, args.device)
        ppl_preds = {"default": default} | {k: predictors[k] for k in args.ppl_kinds if k in predictors}
        ppl = ppl_rows(store, model, tok, bank, ppl_preds, mixed, args, tx["eval"])
    return {"model": Path(model_name).name, "d_model": m.d_model, "d_ffn": m.d_ffn, "num_layers": m.num_layers,
            "dtype": m.dtype, "ffn_bytes_per_layer": budget_mod.ffn_bytes(layout, m.d_ffn), "texts": tx["names"],
            "default_kind": default.meta["kind"], "default_rank": default.ranks()[0],
            "default_cost": default.meta["cost"], "collect_s": collect_s, "default_train_s": default_train_s,
            "train_tokens": int(tr[0].shape[0]), "recall_tokens": int(ev[0].shape[0]),
            "policies": {str(b): r.to_dict() for b, r in mixed.items()}, "kinds": kinds, "ahead": ahead, "ppl": ppl}


def print_tables(results: list[dict]) -> None:
    print("\nKinds at equal cost, top-k recall on held-out text, mean over layers (min over layers at 25%):\n")
    print("| model | kind | rank | bytes vs FFN | FLOPs vs FFN | k=10% | k=25% | k=50% | min k=25% |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for kind, k in r["kinds"].items():
            mark = " (default)" if kind == r["default_kind"] else ""
            print(f"| {r['model']} | {kind}{mark} | {k['rank']} | {100 * k['bytes_frac']:.2f}% | "
                  f"{100 * k['flops_frac']:.2f}% | " + " | ".join(f"{v:.3f}" for v in k["recall_mean"]) +
                  f" | {k['recall25_min']:.3f} |")
    print("\nLook-ahead (layer l+1 from layer l's input), top-k recall, mean over layers 1..L-1:\n")
    print("| model | scorer | bytes vs FFN | k=10% | k=25% | k=50% |\n|---|---|---|---|---|---|")
    for r in results:
        a = r["ahead"]
        if not a:
            continue
        for label, rows, cost in ((f"trained {a['kind']} rank {a['rank']}", a["trained"], f"{100 * a['bytes_frac']:.2f}%"),
                                  ("layer l+1's own scorer on x_l", a["reuse_next_layer_scorer"], "0 (shared)")):
            means = [sum(x[i] for x in rows) / len(rows) for i in range(len(FRACS))]
            print(f"| {r['model']} | {label} | {cost} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    print("\nPerplexity on held-out text, decoded token by token (split = FULL/INT8/INT4 fractions):\n")
    names = sorted({k for r in results for row in r["ppl"] for k in row.get("predictor", {})})
    print("| model | setting | split | bytes vs FULL | oracle ppl | " + " | ".join(f"{n} ppl" for n in names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for r in results:
        for row in r["ppl"]:
            q = row["ratios"]
            cells = [f"{row['predictor'][n]:.3f} ({100 * (row['predictor'][n] / row['oracle'] - 1):+.1f}%)"
                     if n in row.get("predictor", {}) else "-" for n in names]
            print(f"| {r['model']} | {row['setting']} | {q['full']:.2f}/{q['int8']:.2f}/{q['int4']:.2f} | "
                  f"{row['bytes']:.3f} | {row['oracle']:.3f} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tinystories-656k", "stories260k"],
                    help="names under ../shared/models, HF directories or store directories")
    ap.add_argument("--wikitext", action="store_true", help="train/calib/eval on WikiText-2 test (see above)")
    ap.add_argument("--kinds", nargs="+", default=["qcopy", "gateup", "gatecopy4", "gatecopy8", "mlp", "lowrank", "fc1"])
    ap.add_argument("--ppl-kinds", nargs="*", default=["lowrank"], help="kinds besides the default to decode with")
    ap.add_argument("--cost", type=float, default=budget_mod.DEFAULT_COST, help="predictor cost (fraction of FFN bytes)")
    ap.add_argument("--ahead-cost", type=float, default=0.02, help="look-ahead scorer cost (0: skip)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--no-full-only", action="store_true", help="skip the FULL-only rows")
    ap.add_argument("--train-tokens", type=int, default=16384)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--search-tokens", type=int, default=512)
    ap.add_argument("--step", type=float, default=0.125)
    ap.add_argument("--recall-tokens", type=int, default=4096)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--json", default=None, help="write every figure as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ranker-") as tmp:
        results = [bench_model(name, Path(tmp), args) for name in args.models]
    print_tables(results)
    doc = {"results": results, "args": vars(args), "wall_s": time.perf_counter() - t0, "loadavg": os.getloadavg()}
    print(f"\nwall {doc['wall_s']:.0f} s, load average {', '.join(f'{v:.2f}' for v in doc['loadavg'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
