"""``m2cache up`` as a user runs it: real processes on loopback, generate and
status against them, a log directory per run with INFO start-up lines, and every
process (Redis included) gone after SIGINT; a stale Redis on its port is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from m2cache.stack import pid_alive
from stack_helpers import free_base_port, stop_up
from tiers import start_redis


def m2cache(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m2cache.cli", *args], capture_output=True, text=True, **kw)


def test_up_generate_status_and_clean_stop(tmp_path, store_root):
    state = tmp_path / "stack.json"
    base = free_base_port(2)
    up = subprocess.Popen([sys.executable, "-m", "m2cache.cli", "up", "--store-root", str(store_root),
                           "--model", "tinystories-656k", "--workers", "2", "--base-port", str(base),
                           "--state-file", str(state), "--log-dir", str(tmp_path / "logs"), "--run-dir", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 400  # a bound, not a timing: a loaded machine starts slowly
        while not state.exists() and time.monotonic() < deadline and up.poll() is None:
            time.sleep(0.2)
        assert state.exists(), up.stdout.read() if up.poll() is not None else "stack did not come up in 400 s"
        pids = json.loads(state.read_text())["pids"]
        assert set(pids) == {"redis", "store", "dram", "ranker", "worker-0", "worker-1", "gateway"}

        gen = m2cache("generate", "--prompt", "Once upon a time", "--max-new-tokens", "12", "--token-ids",
                      "--state-file", str(state), timeout=120)
        assert gen.returncode == 0, gen.stderr
        ids = json.loads(gen.stdout)
        run = m2cache("run", str(store_root / "tinystories-656k"), "--prompt", "Once upon a time",
                      "--max-new-tokens", "12", "--token-ids", "--full", timeout=120)
        assert ids == json.loads(run.stdout)  # the stack (no policy: full precision) equals in-process

        status = m2cache("status", "--state-file", str(state), "--json", timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["worker-0"]["health"] == "SERVING" and report["dram"]["stats"]["redisUp"] is True
    finally:
        out = stop_up(up, 60)
    assert up.returncode == 0, out
    assert "WARNING: plaintext stack" in out and "[7/7]" in out and "stopped" in out  # says so, shows progress
    time.sleep(0.5)
    assert not [name for name, pid in pids.items() if pid_alive(pid)]  # Redis included
    assert not state.exists()
    runs = [d for d in (tmp_path / "logs").iterdir() if d.is_dir() and not d.is_symlink()]
    assert len(runs) == 1 and (tmp_path / "logs" / "latest").resolve() == runs[0].resolve()
    worker_log = (runs[0] / "worker-0.log").read_text()
    assert "INFO m2cache.worker: starting worker: WorkerConfig(model='tinystories-656k'" in worker_log
    assert "cache_fraction=0.25" in worker_log and f"address='127.0.0.1:{base + 10}'" in worker_log
    assert "serves PLAINTEXT" in (runs[0] / "store.log").read_text()
    assert "gateway on http://127.0.0.1" in (runs[0] / "gateway.log").read_text()


def test_up_never_reuses_a_stale_redis(tmp_path, store_root):
    base = free_base_port(1)
    stale = start_redis(base + 9)  # an orphan of an earlier stack, say
    try:
        res = m2cache("up", "--store-root", str(store_root), "--model", "tinystories-656k", "--base-port", str(base),
                      "--state-file", str(tmp_path / "s.json"), "--log-dir", str(tmp_path / "logs"),
                      "--run-dir", str(tmp_path), timeout=60)
        assert res.returncode == 2 and "never reuses a Redis it did not start" in res.stderr, res.stderr
        assert f"pid {stale.pid}" in res.stderr
        assert pid_alive(stale.pid)  # and it is not ours to kill
    finally:
        stale.stop()


def test_up_refuses_to_serve_plaintext_beyond_loopback(tmp_path, store_root):
    res = m2cache("up", "--store-root", str(store_root), "--model", "tinystories-656k", "--host", "0.0.0.0",
                  "--state-file", str(tmp_path / "s.json"), timeout=60)
    assert res.returncode == 2 and "needs --secure" in res.stderr


def test_up_fails_clearly_without_a_store(tmp_path):
    res = m2cache("up", "--store-root", str(tmp_path), "--model", "missing", timeout=60)
    assert res.returncode == 2 and "no converted store 'missing'" in res.stderr
    assert os.listdir(tmp_path) == []
