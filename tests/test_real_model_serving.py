"""A real chat model served by the whole local stack (``m2cache.stack.Stack``,
what ``m2cache up`` runs: store, DRAM tier + Redis, ranker, worker, gateway as
processes on loopback), driven only through the HTTP API with the official
``openai`` client: ``/v1/completions`` and ``/v1/chat/completions``, each
streamed and not (issue 11: chat templates under transformers 5).

SmolLM2-135M-Instruct has a chat template; the chat answer must be the model's
greedy continuation of exactly the template's token ids (checked against an
in-process generation from those ids, and by the prompt token count)."""
from __future__ import annotations

import openai
import pytest

from m2cache.model.generate import generate
from m2cache.local.loader import load_model
from m2cache.model.providers import FullProvider
from m2cache.stack import Stack, StackConfig, pid_alive
from m2cache.store.reader import NeuronStore
from stack_helpers import free_base_port

NEW_TOKENS = 6
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(smollm2_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    config = StackConfig(store_root=smollm2_store.parent, model=smollm2_store.name, base_port=free_base_port(1),
                         run_dir=tmp, log_dir=tmp / "logs", state_file=tmp / "stack.json", start_timeout_s=300,
                         overrides={"worker": {"cache_fraction": 1.0}})
    stack = Stack(config)
    try:
        stack.start()
        pids = stack.pids()
        client = openai.OpenAI(base_url=f"http://{config.addr(80)}/v1", api_key="unused", timeout=300, max_retries=0)
        yield client, smollm2_store.name
    finally:
        stack.stop()
    assert not [name for name, pid in pids.items() if pid_alive(pid)]


@pytest.fixture(scope="module")
def reference(smollm2_store):
    """In-process greedy continuation (full precision, as the policy-less worker runs)."""
    store = NeuronStore(smollm2_store)
    model, tok, bank = load_model(store)
    provider = FullProvider(bank)

    def continuation(ids: list[int]) -> tuple[list[int], str]:
        out = generate(model, ids, NEW_TOKENS, provider)
        return out, tok.decode(out, skip_special_tokens=True)

    yield tok, continuation
    store.close()


def test_completions_streamed_and_not(served, reference):
    client, model = served
    tok, continuation = reference
    ids, want = continuation(tok.encode(PROMPT))
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert resp.choices[0].text == want
    assert resp.usage.prompt_tokens == len(tok.encode(PROMPT)) and resp.usage.completion_tokens == len(ids)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_uses_the_models_chat_template(served, reference):
    client, model = served
    tok, continuation = reference
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    template_ids = list(tok(text, add_special_tokens=False).input_ids)
    ids, want = continuation(template_ids)
    assert want.strip(), "the model should answer something"
    resp = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == want
    assert resp.usage.prompt_tokens == len(template_ids) and resp.usage.completion_tokens == len(ids)
    stream = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=NEW_TOKENS,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    assert stream[-1].choices[0].finish_reason in ("length", "stop")
