"""Predictor kinds, their store/wire form, cost accounting, look-ahead,
resumable training and `m2cache eval`, on the real tiny model stories260k
(and the random tiny OPT checkpoint for the ReLU kind) in real LMDB stores."""
import json
import shutil

import pytest
import torch

from checkpoints import corpus, make_tiny_checkpoint, real_model_dir
from m2cache.cli import main as cli_main
from m2cache.codec.format import Precision
from m2cache.convert.writer import convert
from m2cache.errors import FailedPrecondition, InvalidArgument
from m2cache.local.loader import load_model
from m2cache.model.providers import FullProvider
from m2cache.predictors import budget, fit, storage
from m2cache.predictors.checkpoint import FILENAME
from m2cache.predictors.collect import collect_ffn_inputs, full_weights, tokenize
from m2cache.predictors.kinds import LowRankPredictor
from m2cache.predictors.kinds.qcopy import dequantize_rows, quantize_rows
from m2cache.predictors.pipeline import TrainJob, open_store, run_training, train_on_inputs
from m2cache.predictors.predictor import Predictor
from m2cache.predictors.quality import ahead_recalls, layer_recalls, standard_rankers
from m2cache.predictors.tensors import tensor_from_bytes, tensor_to_bytes

MODEL = "stories260k"
KINDS = ("qcopy", "gateup", "gatecopy4", "gatecopy8", "mlp", "lowrank")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pred") / MODEL
    convert(real_model_dir(MODEL), path, progress=False)
    return path


@pytest.fixture(scope="module")
def data(store_dir):
    """(train inputs, held-out inputs, bank, manifest, layout) of stories260k."""
    with open_store(store_dir) as store:
        model, tok, bank = load_model(store)
        for layer in range(model.config.num_layers):
            full_weights(bank, layer)  # decoded into the bank before the store closes
        seqs = lambda name, n: tokenize(tok, corpus(name).read_text(), 256, n, model.config.bos_token_id)  # noqa: E731
        tr = collect_ffn_inputs(model, FullProvider(bank), seqs("tinystories/train_2316.txt", 2048))
        ev = collect_ffn_inputs(model, FullProvider(bank), seqs("tinystories/valid_500-999_eval.txt", 1024))
        return tr, ev, bank, store.manifest, store.layout


@pytest.fixture(scope="module")
def trained(data):
    """One predictor per kind at the default cost (look-ahead for gateup), 1 epoch."""
    tr, _, bank, m, layout = data
    out = {}
    for kind in KINDS:
        cost = 0.09 if kind == "gatecopy8" else budget.DEFAULT_COST  # the INT8 gate copy alone is 8.8%
        out[kind] = train_on_inputs(tr, bank, m, layout, TrainJob("", kind=kind, cost=cost, epochs=1,
                                                                   ahead_cost=0.03 if kind == "gateup" else 0))
    return out


def _recall25(p, data) -> list[float]:
    _, ev, bank, m, _ = data
    rec = layer_recalls(ev, lambda l: full_weights(bank, l), m.ffn_kind, standard_rankers(p), (0.25,))
    return [r[0] for r in rec["predictor"]]


def test_kinds_beat_random_and_the_old_lowrank_at_equal_cost(trained, data):
    recalls = {kind: _recall25(p, data) for kind, p in trained.items()}
    mean = {k: sum(v) / len(v) for k, v in recalls.items()}
    # Measured on held-out text (1 epoch, 2048 tokens): qcopy ~0.72, gatecopy4 ~0.60, gateup ~0.42, lowrank ~0.35.
    assert all(r > 0.3 for rs in recalls.values() for r in rs), recalls
    assert mean["qcopy"] > 0.65 and mean["qcopy"] > max(v for k, v in mean.items() if k != "qcopy"), mean
    assert mean["gatecopy4"] > mean["gateup"] > mean["lowrank"] - 0.02, mean


def test_default_kind_and_cost_stay_within_five_percent(trained, data):
    _, _, _, m, layout = data
    ffn_b = budget.ffn_bytes(layout, m.d_ffn)
    for kind, p in trained.items():
        assert p.num_bytes(ahead=False) == sum(budget.bytes_for(kind, m.d_model, m.d_ffn, r) for r in p.ranks()), kind
        assert p.flops_per_token() > 0
    assert budget.choose_kind("auto", "swiglu", m.d_model, m.d_ffn, 0.05 * ffn_b) == ("qcopy", 2)
    assert trained["qcopy"].cost(ffn_b, 1)["bytes_frac"] <= 0.05
    # SmolLM2-135M's shapes (fp16, d 576, F 1536): 1-bit copies, 4.3% of the FFN bytes.
    smol_ffn = 1536 * 3 * 576 * 2
    kind, bits = budget.choose_kind("auto", "swiglu", 576, 1536, 0.05 * smol_ffn)
    assert (kind, bits) == ("qcopy", 1) and budget.bytes_for(kind, 576, 1536, bits) <= 0.05 * smol_ffn
    with pytest.raises(InvalidArgument, match="does not fit"):
        budget.choose_kind("gatecopy4", "swiglu", 576, 1536, 0.05 * smol_ffn)


def test_every_kind_round_trips_through_the_store_and_the_wire(trained, data, tmp_path, store_dir):
    _, ev, *_ = data
    copy = tmp_path / "s"
    shutil.copytree(store_dir, copy)
    x = ev[2][:16]
    for kind, p in trained.items():
        version = storage.save_predictor(copy, p, p.meta)
        q = storage.load_predictor(copy, version)
        assert q.kinds == p.kinds and q.meta["kinds"] == p.kinds and sorted(q.ahead) == sorted(p.ahead)
        wire = {}
        for n, t in p.tensors().items():
            raw, dtype = tensor_to_bytes(t)
            wire[n] = tensor_from_bytes(raw, dtype, list(t.shape))
            assert wire[n].dtype == t.dtype
        for r in (q, Predictor.from_tensors(wire)):
            assert all(torch.equal(t, p.tensors()[n]) for n, t in r.tensors().items()), kind
            # (scores agree to float rounding: the same math on differently aligned buffers)
            assert torch.allclose(r.scores(2, x), p.scores(2, x), rtol=1e-5, atol=1e-7), kind
            assert r.num_bytes() == p.num_bytes()
    assert storage.load_predictor(copy).kinds == trained[KINDS[-1]].kinds


def test_old_lowrank_stores_still_load(store_dir, tmp_path):
    """A version written by the old code: float32 a/b/bias tensors, no kinds in its meta."""
    copy = tmp_path / "old"
    shutil.copytree(store_dir, copy)
    g = torch.Generator().manual_seed(0)
    layers = [LowRankPredictor(torch.randn(64, 8, generator=g), torch.randn(8, 172, generator=g), torch.zeros(172))
              for _ in range(5)]
    tensors = {n: t.numpy().tobytes() for n, t in Predictor(layers).tensors().items()}
    from m2cache.codec.format import crc32
    meta = {"num_layers": 5, "ranks": [8] * 5, "d_model": 64, "d_ffn": 172,
            "tensors": {n: {"shape": list(t.shape), "dtype": "float32", "crc32": crc32(tensors[n])}
                        for n, t in Predictor(layers).tensors().items()}}
    assert storage._write(copy, storage._put_predictor, tensors, meta) == 1
    p = storage.load_predictor(copy)
    assert p.kinds == ["lowrank"] * 5 and p.ranks() == [8] * 5
    x = torch.randn(3, 64, generator=g)
    assert torch.allclose(p.scores(1, x), x @ layers[1].a @ layers[1].b)


def test_qcopy_quantiser_round_trips_and_orders_like_the_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 70, generator=g)
    x = torch.randn(200, 70, generator=g)
    exact = x @ w.T
    prev = -1.0
    for bits in (1, 2, 4):
        codes, scale = quantize_rows(w, bits)
        assert codes.dtype == torch.uint8 and codes.shape == (40, -(-70 * bits // 8))
        approx = x @ dequantize_rows(codes, scale, bits, 70).T
        corr = torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1].item()
        assert corr > {1: 0.75, 2: 0.9, 4: 0.98}[bits] and corr > prev, (bits, corr)
        prev = corr
    assert torch.equal(dequantize_rows(*quantize_rows(torch.tensor([[0.5, -0.5, 0.5]]), 1), 1, 3),
                       torch.tensor([[0.5, -0.5, 0.5]]))


def test_qcopy_calibrated_rows_cut_the_error_of_x_dot_w_on_held_out_inputs(data):
    """GPTQ-style rounding against the layer's recorded FFN inputs: same codes
    format, smaller error of x . w on held-out inputs than nearest rounding."""
    tr, ev, bank, *_ = data
    w = bank.vectors(1, Precision.FULL)[:, 0].float()  # gate rows [F, d]
    exact = ev[1] @ w.T
    for bits in (1, 2, 4):
        err = {}
        for name, x in (("nearest", None), ("calibrated", tr[1])):
            codes, scale = quantize_rows(w, bits, x)
            assert codes.shape == (w.shape[0], -(-w.shape[1] * bits // 8)) and scale.dtype == torch.float16
            err[name] = ((ev[1] @ dequantize_rows(codes, scale, bits, w.shape[1]).T - exact) ** 2).mean().item()
        assert err["calibrated"] < 0.9 * err["nearest"], (bits, err)
    with pytest.raises(InvalidArgument, match="calibration inputs"):
        quantize_rows(w, 1, tr[1][:, :5])


def test_whitened_svd_init_is_exact_at_full_rank_and_beats_plain_svd(data):
    tr, ev, bank, *_ = data
    w = bank.vectors(1, Precision.FULL)[:, 0]  # gate rows [F, d]
    cov = fit.covariance(tr[1])
    a, b = fit.reduced_rank(cov, w.T, 64)
    assert torch.allclose(ev[1] @ a @ b, ev[1] @ w.T, atol=1e-3)
    a, b = fit.reduced_rank(cov, w.T, 8)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    plain = ev[1] @ vh[:8].T @ (u[:, :8] * s[:8]).T
    err = lambda y: ((y - ev[1] @ w.T) ** 2).mean().item()  # noqa: E731
    assert err(ev[1] @ a @ b) < err(plain)


def test_look_ahead_scores_the_next_layer(trained, data):
    _, ev, bank, m, _ = data
    p = trained["gateup"]
    assert sorted(p.ahead) == [1, 2, 3, 4]
    weights = lambda l: full_weights(bank, l)  # noqa: E731
    trained_rec = ahead_recalls(ev, weights, m.ffn_kind, p, (0.25,))
    fallback = ahead_recalls(ev, weights, m.ffn_kind, trained["qcopy"], (0.25,))  # no ahead: next layer's scorer
    assert all(0.3 < r[0] <= 1 for r in trained_rec + fallback), (trained_rec, fallback)
    with pytest.raises(InvalidArgument, match="last"):
        p.scores_ahead(m.num_layers - 1, ev[0][:2])


def test_relu_model_gets_an_fc1_sign_predictor(tmp_path):
    """The random tiny OPT checkpoint (no tokenizer: fed random token ids)."""
    path = tmp_path / "opt"
    convert(make_tiny_checkpoint("opt", tmp_path / "hf"), path, progress=False)
    with open_store(path) as store:
        model, _, bank = load_model(store)
        g = torch.Generator().manual_seed(0)
        seqs = [torch.randint(0, model.config.vocab_size, (64,), generator=g) for _ in range(8)]
        inputs = collect_ffn_inputs(model, FullProvider(bank), seqs)
        p = train_on_inputs(inputs, bank, store.manifest, store.layout, TrainJob("", epochs=1))
        rec = layer_recalls(inputs, lambda l: full_weights(bank, l), "relu", standard_rankers(p), (0.25,))
    assert p.kinds == ["fc1"] * p.num_layers and p.meta["cost"]["bytes_frac"] <= 0.05
    assert all(r[0] > 0.3 for r in rec["predictor"]), rec  # random: 0.25


def test_training_resumes_after_an_interruption(store_dir, tmp_path):
    text = corpus("tinystories/valid_000-499_calib.txt").read_text()
    job = TrainJob(text, max_tokens=512, epochs=1, kind="gateup")
    fresh, broken = tmp_path / "fresh", tmp_path / "broken"
    shutil.copytree(store_dir, fresh)
    shutil.copytree(store_dir, broken)
    run_training(fresh, job)
    first = []

    def interrupt(stage, step, total, loss):
        if stage == "train":
            first.append(total)
            if step == 2 * total // 5 + 1:  # inside layer 2, after layers 0 and 1 finished
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(broken, job, interrupt)
    assert (broken / FILENAME).is_file()
    again = []
    run_training(broken, job, lambda stage, i, total, loss: stage == "train" and again.append(total))
    assert again and again[0] == 3 * first[0] // 5  # only layers 2, 3 and 4 were trained again
    assert not (broken / FILENAME).exists()
    a, b = storage.load_predictor(fresh), storage.load_predictor(broken)
    assert all(torch.equal(a.tensors()[n], b.tensors()[n]) for n in a.tensors())


def test_eval_command_reports_the_figures(store_dir, tmp_path, capsys):
    store = tmp_path / "e"
    shutil.copytree(store_dir, store)
    calib = corpus("tinystories/valid_000-499_calib.txt")
    assert cli_main(["train-predictor", str(store), "--text", str(calib), "--max-tokens", "512", "--epochs", "1",
                     "--no-progress"]) == 0
    with pytest.raises(FailedPrecondition, match="no policy"):
        from m2cache.predictors.scorecard import EvalJob, run_eval
        run_eval(store, EvalJob("Once upon a time " * 40))
    for b in ("0.3", "0.5"):
        assert cli_main(["search-policy", str(store), "--text", str(calib), "--budget", b, "--step", "0.5",
                         "--max-tokens", "48", "--no-progress"]) == 0
    out = tmp_path / "eval.json"
    evaltext = corpus("tinystories/valid_500-999_eval.txt")
    assert cli_main(["eval", str(store), "--text", str(evaltext), "--budget", "0.3", "--max-tokens", "64",
                     "--recall-tokens", "256", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["budget"] == 0.3 and report["byte_fraction"] <= 0.3 + 1e-9
    assert 1 < report["ppl_dense"] < report["ppl_oracle"] * 1.5 and report["ppl_predictor"] > 1
    assert 0.5 < report["recall_top25"] <= 1 and len(report["recall_top25_per_layer"]) == 5
    assert report["predictor_kind"] == "qcopy" and report["predictor_cost"]["bytes_frac"] <= 0.05
    assert "predictor" in capsys.readouterr().out
    assert cli_main(["eval", str(store), "--text", str(evaltext), "--budget", "0.9"]) == 2  # no such policy
