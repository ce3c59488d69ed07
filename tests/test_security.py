"""Transport security and authentication, in-process over real gRPC servers on
loopback: mTLS refuses a client without a certificate (or with one from another
CA) and serves one with it; bearer tokens guard the worker API
(UNAUTHENTICATED, counted) but not health checks; the local PKI reuses valid
certificates and renews what no longer fits."""
from __future__ import annotations

import grpc
import pytest

from m2cache import grpc_util, pki
from m2cache.commands import certs
from m2cache.security import AUTH_REFUSED, SecurityConfig, bearer
from m2cache.worker import server as worker_server
from m2cache_client import Client, Unauthenticated, Unavailable
from m2cache_client.pb import worker_pb2_grpc
from tiers import DramHandle, start_redis
from worker_stack import WorkerHandle

MODEL = "tinystories-656k"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    ca, pairs, keys = certs.make(out)
    return out, ca, pairs, keys


def server_security(pki_dir, service: str, api_keys: bool = False) -> SecurityConfig:
    out, ca, pairs, keys = pki_dir
    return SecurityConfig(tls_cert=str(pairs[service].cert), tls_key=str(pairs[service].key), tls_ca=str(ca.cert),
                          api_keys_file=str(keys) if api_keys else "")


def client_security(pki_dir, cert: bool = True, token: bool = False, ca=None) -> SecurityConfig:
    out, ca_pair, pairs, keys = pki_dir
    return SecurityConfig(tls_cert=str(pairs["client"].cert) if cert else "",
                          tls_key=str(pairs["client"].key) if cert else "",
                          tls_ca=str(ca or ca_pair.cert), token_file=str(keys) if token else "")


def test_mtls_refuses_clients_without_a_certificate_from_the_ca(pki_dir, tmp_path):
    server, port, _ = grpc_util.create_server("127.0.0.1:0", [], ["m2cache.v1.NeuronStore"],
                                              security=server_security(pki_dir, "store"))
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        ok = grpc_util.check_health(target, "m2cache.v1.NeuronStore", security=client_security(pki_dir))
        assert ok == "SERVING"
        assert grpc_util.check_health(target, security=SecurityConfig()) == "UNREACHABLE"  # plaintext
        assert grpc_util.check_health(target, security=client_security(pki_dir, cert=False)) == "UNREACHABLE"
        # a certificate from another CA is refused too
        other_ca, other = pki.ensure(tmp_path / "other", {"client": ["localhost", "127.0.0.1"]})
        stranger = SecurityConfig(tls_cert=str(other["client"].cert), tls_key=str(other["client"].key),
                                  tls_ca=str(pki_dir[1].cert))
        assert grpc_util.check_health(target, security=stranger) == "UNREACHABLE"
        # and a client trusting another CA does not trust this server
        assert grpc_util.check_health(target, security=client_security(pki_dir, ca=other_ca.cert)) == "UNREACHABLE"
    finally:
        server.stop(0).wait()


@pytest.fixture(scope="module")
def secure_worker(store_service, pki_dir):
    """A real worker (over a real DramTier and Redis) served over mTLS with API keys."""
    redis = start_redis()
    dram = DramHandle(store_service.target, redis.url, budget_bytes=1 << 20)
    plain = WorkerHandle(dram.target, MODEL)
    servicer = worker_server.WorkerServicer(plain.runtime)
    server, port, _ = grpc_util.create_server(
        "127.0.0.1:0", [(worker_pb2_grpc.add_WorkerServicer_to_server, servicer)], ["m2cache.v1.Worker"],
        security=server_security(pki_dir, "worker", api_keys=True))
    server.start()
    yield f"127.0.0.1:{port}", plain
    server.stop(0).wait()
    plain.stop()
    dram.stop()
    redis.stop()


def client_kwargs(pki_dir, cert=True, token=True) -> dict:
    out, ca, pairs, keys = pki_dir
    kw = {"tls": True, "root_certificates": ca.cert.read_bytes(), "retries": 0}
    if cert:
        kw.update(certificate_chain=pairs["client"].cert.read_bytes(), private_key=pairs["client"].key.read_bytes())
    if token:
        kw["token"] = keys.read_text().strip()
    return kw


def test_worker_api_needs_certificate_and_token(secure_worker, pki_dir):
    target, plain = secure_worker
    ids = plain.runtime.encode("Once upon a time")
    want, _ = plain.generate(ids, 6)  # the same runtime, over plaintext, as the reference
    with Client(target, model=MODEL, timeout_s=30, **client_kwargs(pki_dir)) as c:
        assert c.generate(prompt_token_ids=ids, max_new_tokens=6).token_ids == want
    refused = AUTH_REFUSED.labels("missing")._value.get()
    with Client(target, model=MODEL, timeout_s=30, **client_kwargs(pki_dir, token=False)) as c:
        with pytest.raises(Unauthenticated, match="missing bearer token"):
            c.generate("hi", max_new_tokens=2)
    assert AUTH_REFUSED.labels("missing")._value.get() == refused + 1  # counted
    with Client(target, model=MODEL, timeout_s=30, token="wrong", **{k: v for k, v in
                client_kwargs(pki_dir, token=False).items()}) as c:
        with pytest.raises(Unauthenticated, match="invalid bearer token"):
            c.generate("hi", max_new_tokens=2)
    with Client(target, model=MODEL, timeout_s=10, **client_kwargs(pki_dir, cert=False)) as c:
        with pytest.raises(Unavailable):  # no client certificate: the TLS handshake fails
            c.generate("hi", max_new_tokens=2)
    with Client(target, model=MODEL, timeout_s=10, retries=0) as c:  # plaintext
        with pytest.raises(Unavailable):
            c.generate("hi", max_new_tokens=2)
    # health stays open to a client with a certificate but no token (probes)
    assert grpc_util.check_health(target, "m2cache.v1.Worker", security=client_security(pki_dir)) == "SERVING"
    # GetStats is API too
    with grpc_util.channel(target, security=client_security(pki_dir)) as ch:
        from m2cache_client.pb import common_pb2

        stub = worker_pb2_grpc.WorkerStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetStats(common_pb2.StatsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = SecurityConfig(token_file=str(pki_dir[3])).token
        assert stub.GetStats(common_pb2.StatsRequest(), timeout=10, metadata=bearer(token)).tokens > 0


def test_pki_reuses_valid_certificates_and_renews_others(tmp_path):
    names = {"store": ["localhost", "127.0.0.1", "store"]}
    ca, pairs = pki.ensure(tmp_path, names)
    first = pairs["store"].cert.read_bytes()
    assert (tmp_path / "store.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path.stat().st_mode & 0o777) == 0o700
    _ca, again = pki.ensure(tmp_path, names)
    assert again["store"].cert.read_bytes() == first  # reused
    _ca, wider = pki.ensure(tmp_path, {"store": names["store"] + ["store.example"]})
    second = wider["store"].cert.read_bytes()
    assert second != first  # a new name: re-issued
    (tmp_path / "ca.crt").write_text("garbage")
    ca2, fresh = pki.ensure(tmp_path, names)
    assert ca2.cert.read_bytes() != b"garbage" and fresh["store"].cert.read_bytes() not in (first, second)


def test_security_config_validates_its_files(tmp_path):
    from m2cache.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="go together"):
        SecurityConfig(tls_cert="x")
    with pytest.raises(InvalidArgument, match="cannot read"):
        SecurityConfig(tls_ca=str(tmp_path / "missing.crt"))
    (tmp_path / "keys").write_text("# comment only\n")
    with pytest.raises(InvalidArgument, match="holds no key"):
        SecurityConfig(api_keys_file=str(tmp_path / "keys")).api_keys
