"""``m2cache run`` on a converted real model prints what transformers generates."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from checkpoints import REAL_MODELS, real_model_dir
from m2cache import cli
from m2cache.convert.writer import convert

PROMPT = "Once upon a time"


@pytest.fixture(scope="module", params=REAL_MODELS)
def converted(request, tmp_path_factory):
    store = tmp_path_factory.mktemp(request.param) / "store"
    convert(real_model_dir(request.param), store, progress=False)
    return request.param, store


def _run(capsys, *argv: str) -> str:
    return _run_err(capsys, *argv)[0]


def _run_err(capsys, *argv: str) -> tuple[str, str]:
    assert cli.main(["run", *argv]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def _transformers_greedy(name: str, new_tokens: int) -> list[int]:
    hf_dir = real_model_dir(name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
    return out[0].tolist()


def test_run_token_ids_equal_transformers_greedy(converted, capsys):
    name, store = converted
    out = _run(capsys, str(store), "--prompt", PROMPT, "--max-new-tokens", "16", "--token-ids")
    assert json.loads(out) == _transformers_greedy(name, 16)
    # the default (the store's policy; full precision while a store has none) and --full agree,
    # and both run the dense path: every neuron resident, nothing ranked
    full, err = _run_err(capsys, str(store), "--prompt", PROMPT, "--max-new-tokens", "16", "--token-ids", "--full")
    assert full == out and "every neuron resident" in err and "tok/s" in err and "TTFT" in err


def test_run_with_a_budget_uses_the_hbm_cache(converted, capsys):
    name, store = converted
    full = _run(capsys, str(store), "--prompt", PROMPT, "--max-new-tokens", "16", "--token-ids", "--full")
    out, err = _run_err(capsys, str(store), "--prompt", PROMPT, "--max-new-tokens", "16", "--token-ids",
                        "--budget", "0.25", "--window", "2")
    assert json.loads(out) == json.loads(full)  # every neuron still at full precision, a quarter of them cached
    assert "HBM hit rate" in err and "MiB/token from the store" in err
    hit = int(err.split("HBM hit rate ")[1].split("%")[0])
    assert 5 <= hit <= 40, err  # every neuron is used every token and a quarter fits: about a quarter hits


def test_run_prints_text_and_honours_precision_and_seed(converted, capsys):
    name, store = converted
    text = _run(capsys, str(store), "--prompt", PROMPT, "--max-new-tokens", "12")
    assert text.strip() and "[" not in text
    sampled = [_run(capsys, str(store), "--prompt", PROMPT, "--max-new-tokens", "24", "--token-ids",
                    "--precision", "int8", "--temperature", "1.0", "--top-k", "40", "--seed", str(s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_run_reports_a_missing_store(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope"), "--prompt", PROMPT]) == 2
    assert "no m2cache store" in capsys.readouterr().err
