"""A model whose embedding alone exceeds the 256 MiB payload limit (issue 11,
item 4): a random Qwen2 checkpoint with Qwen2-0.5B's vocabulary (151,936) and
hidden size (896), untied head, served by ``m2cache up`` and answering the
OpenAI endpoints through the ``openai`` client, streamed and not. Dense tensors
reach the worker streamed in bounded chunks (NeuronStore and DramTier
StreamDense); a unary FetchDense of them is refused, deterministically."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import grpc
import openai
import pytest
import torch
import transformers

from checkpoints import real_model_dir
from m2cache.convert.writer import convert
from m2cache_client.pb import common_pb2
from stack_helpers import stop_up
from tiers import StoreHandle, free_port, status_of

MODEL = "qwen2-wide-vocab"
VOCAB, HIDDEN = 151_936, 896
TOKENIZER_VOCAB = 2048  # the tinystories-656k tokenizer the checkpoint borrows


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wide")
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        # tokens past the borrowed tokenizer's vocabulary never win (zero logits against
        # random ones), so every generated id decodes to text
        model.lm_head.weight[TOKENIZER_VOCAB:] = 0
    hf = tmp / "hf"
    model.to(torch.float16).save_pretrained(hf, safe_serialization=True)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(real_model_dir("tinystories-656k") / name, hf / name)
    manifest = convert(hf, tmp / "root" / MODEL, progress=False)
    embed = manifest.dense["model.embed_tokens.weight"]
    assert embed["shape"] == [VOCAB, HIDDEN] and VOCAB * HIDDEN * 2 > 256 << 20  # the embedding alone
    shutil.rmtree(hf)
    return tmp / "root"


def test_unary_dense_is_refused_and_streamed_dense_is_whole(store_root):
    handle = StoreHandle(store_root)
    try:
        req = common_pb2.DenseRequest(model=MODEL, names=["model.embed_tokens.weight"])
        code, details = status_of(lambda: handle.stub.FetchDense(req, timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "StreamDense" in details
        chunks = list(handle.stub.StreamDense(req, timeout=60))
        assert len(chunks) > 60 and max(len(c.data) for c in chunks) <= handle.config.stream_chunk_bytes
        whole = b"".join(c.data for c in chunks)
        assert whole == handle.catalog.get(MODEL).get_dense_bytes("model.embed_tokens.weight")
    finally:
        handle.stop()


def test_served_by_m2cache_up_through_the_openai_client(store_root, tmp_path):
    state = tmp_path / "stack.json"
    base = free_port() // 100 * 100 % 40000 + 20000
    up = subprocess.Popen([sys.executable, "-m", "m2cache.cli", "up", "--store-root", str(store_root),
                           "--model", MODEL, "--workers", "1", "--base-port", str(base),
                           "--state-file", str(state), "--log-dir", str(tmp_path / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not state.exists() and time.monotonic() < deadline and up.poll() is None:
            time.sleep(0.2)
        assert state.exists(), up.stdout.read() if up.poll() is not None else "stack did not come up in 240 s"
        url = json.loads(state.read_text())["gateway"]
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
        whole = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
        parts = list(oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                            stream=True))
        assert whole.usage.completion_tokens == 8 and whole.choices[0].text
        assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
        messages = [{"role": "user", "content": "Tell me a story."}]
        chat = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        deltas = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                  stream=True))
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
        assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    finally:
        out = stop_up(up, 90)
    assert up.returncode == 0, out
