"""``m2cache serve store|dram`` as real processes: config from env and flags,
health SERVING, the DramTier starting its own redis-server, and a graceful
exit on SIGTERM (sent by PID) that also stops that Redis."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import redis

from tiers import free_port, health, wait_for


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "m2cache.cli", "serve", *args], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def terminate(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("did not exit within 15 s of SIGTERM")


def test_store_and_dram_processes_start_serve_and_stop(store_root, tmp_path):
    store_t, dram_t, redis_port = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", free_port())
    secret = tmp_path / "redis.pass"
    secret.write_text("s3cret-for-the-test\n")
    secret.chmod(0o600)
    store = spawn(["store", "--address", store_t], {"M2CACHE_STORE_ROOT": str(store_root)})
    dram = None
    try:
        wait_for(lambda: health(store_t, "m2cache.v1.NeuronStore") == "SERVING", 30, "store SERVING", 0.2)
        dram = spawn(["dram", "--address", dram_t, "--store-target", store_t, "--preload-precisions", "int4",
                      "--preload", "layer"],
                     {"M2CACHE_DRAM_REDIS_PORT": str(redis_port), "M2CACHE_DRAM_REDIS_PASSWORD_FILE": str(secret)})
        wait_for(lambda: health(dram_t, "m2cache.v1.DramTier") == "SERVING", 30, "dram SERVING", 0.2)
        with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
            redis.Redis(port=redis_port, socket_timeout=2).dbsize()  # its own Redis requires the password
        client = redis.Redis(port=redis_port, socket_timeout=2, password="s3cret-for-the-test")
        assert client.config_get("save")["save"] == "" and client.config_get("appendonly")["appendonly"] == "no"
        wait_for(lambda: client.dbsize() > 0, 10, "pinned layers in the tier's own Redis")
        assert terminate(dram) == 0, dram.stderr.read().decode()[-2000:]
        try:
            client.ping()
            raise AssertionError("the tier's redis-server outlived it")
        except redis.exceptions.ConnectionError:
            pass
    finally:
        if dram is not None:
            terminate(dram)
        code = terminate(store)
    assert code == 0, store.stderr.read().decode()[-2000:]
