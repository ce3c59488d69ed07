"""``m2cache up --secure`` as a user runs it: every service over mTLS, clients
need the client certificate and the API key the stack made (the state file says
where), the gateway serves HTTPS with API keys; a client without a certificate or
a token is refused, with them it works, and `m2cache generate`/`status` find
everything in the state file."""
from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from m2cache import grpc_util
from m2cache.stack import client_kwargs, pid_alive, state_security
from m2cache_client import Client, Unauthenticated, Unavailable
from m2cache_client.pb import common_pb2, store_pb2_grpc
from stack_helpers import free_base_port, stop_up

MODEL = "tinystories-656k"


def m2cache(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m2cache.cli", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def secure_stack(store_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    state_file = tmp / "stack.json"
    up = subprocess.Popen([sys.executable, "-m", "m2cache.cli", "up", "--secure", "--store-root", str(store_root),
                           "--model", MODEL, "--base-port", str(free_base_port(1)), "--run-dir", str(tmp),
                           "--state-file", str(state_file), "--log-dir", str(tmp / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400  # a bound for a loaded machine, not a timing
    while not state_file.exists() and time.monotonic() < deadline and up.poll() is None:
        time.sleep(0.2)
    if not state_file.exists():
        up.kill()
        pytest.fail(f"secure stack did not come up:\n{up.communicate()[0]}")
    state = json.loads(state_file.read_text())
    yield state, state_file
    out = stop_up(up, 90)
    assert up.returncode == 0, out
    time.sleep(0.5)
    assert not [name for name, pid in state["pids"].items() if pid_alive(pid)]
    assert "WARNING: plaintext" not in out and "secure: mTLS everywhere" in out


def test_state_file_names_the_credentials(secure_stack):
    state, _ = secure_stack
    assert state["secure"] is True and state["gateway"].startswith("https://")
    for key in ("ca", "cert", "key"):
        assert Path(state["tls"][key]).is_file()
    assert Path(state["api_key_file"]).stat().st_mode & 0o777 == 0o600


def test_worker_refuses_clients_without_certificate_or_token(secure_stack):
    state, _ = secure_stack
    good = client_kwargs(state)
    with Client(state["workers"], model=MODEL, timeout_s=60, **good) as c:
        ids = c.generate("Once upon a time", max_new_tokens=8, temperature=0).token_ids
    assert len(ids) == 8
    no_token = {k: v for k, v in good.items() if k != "token"}
    with Client(state["workers"], model=MODEL, timeout_s=30, retries=0, **no_token) as c:
        with pytest.raises(Unauthenticated):
            c.generate("hi", max_new_tokens=2)
    no_cert = {k: v for k, v in good.items() if k not in ("certificate_chain", "private_key")}
    with Client(state["workers"], model=MODEL, timeout_s=10, retries=0, **no_cert) as c:
        with pytest.raises(Unavailable):
            c.generate("hi", max_new_tokens=2)
    with Client(state["workers"], model=MODEL, timeout_s=10, retries=0) as c:
        with pytest.raises(Unavailable):
            c.generate("hi", max_new_tokens=2)


def test_store_refuses_a_plain_client_that_would_download_the_model(secure_stack):
    state, _ = secure_stack
    with grpc.insecure_channel(state["store"]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            store_pb2_grpc.NeuronStoreStub(ch).ListModels(common_pb2.ListModelsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc_util.channel(state["store"], security=state_security(state)) as ch:
        models = store_pb2_grpc.NeuronStoreStub(ch).ListModels(common_pb2.ListModelsRequest(), timeout=10)
    assert MODEL in list(models.models)


def test_gateway_https_and_api_keys(secure_stack):
    state, _ = secure_stack
    key = Path(state["api_key_file"]).read_text().strip()
    url = state["gateway"]
    with httpx.Client(verify=ssl.create_default_context(cafile=state["tls"]["ca"]), timeout=60) as http:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
        assert http.post(f"{url}/v1/completions", json=body).status_code == 401
        wrong = http.post(f"{url}/v1/completions", json=body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert http.get(f"{url}/health").json()["status"] == "ok"  # probes need no key
        metrics = http.get(f"{url}/metrics").text
        assert 'm2cache_gateway_auth_refused_total{reason="missing"} 1.0' in metrics
        assert 'm2cache_gateway_auth_refused_total{reason="invalid"} 1.0' in metrics
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key=key, http_client=http, max_retries=0)
        whole = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
        streamed = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                          stream=True)
        assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the HTTPS port
        httpx.get(url.replace("https://", "http://") + "/health", timeout=5)


def test_generate_and_status_use_the_state_file(secure_stack):
    state, state_file = secure_stack
    gen = m2cache("generate", "--prompt", "Once upon a time", "--max-new-tokens", "8", "--token-ids",
                  "--state-file", str(state_file), timeout=120)
    assert gen.returncode == 0, gen.stderr
    with Client(state["workers"], model=MODEL, timeout_s=60, **client_kwargs(state)) as c:
        done = c.generate("Once upon a time", max_new_tokens=8)
    assert json.loads(gen.stdout) == done.prompt_token_ids + done.token_ids
    status = m2cache("status", "--state-file", str(state_file), "--json", timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["store"]["health"] == "SERVING" and int(report["worker-0"]["stats"]["requests"]) >= 1
