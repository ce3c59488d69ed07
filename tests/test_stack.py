"""``m2cache up`` as a user runs it: real processes on loopback, generate and
status against them, and every process gone after SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from m2cache.stack import pid_alive
from tiers import free_port


def m2cache(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m2cache.cli", *args], capture_output=True, text=True, **kw)


def test_up_generate_status_and_clean_stop(tmp_path, store_root):
    state = tmp_path / "stack.json"
    base = free_port() // 100 * 100 % 40000 + 20000  # a block of ports unlikely to collide
    up = subprocess.Popen([sys.executable, "-m", "m2cache.cli", "up", "--store-root", str(store_root),
                           "--model", "tinystories-656k", "--workers", "2", "--base-port", str(base),
                           "--state-file", str(state), "--log-dir", str(tmp_path / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and time.monotonic() < deadline and up.poll() is None:
            time.sleep(0.2)
        assert state.exists(), up.stdout.read() if up.poll() is not None else "stack did not come up in 120 s"
        pids = json.loads(state.read_text())["pids"]
        assert set(pids) == {"store", "dram", "ranker", "worker-0", "worker-1", "gateway"}

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
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    time.sleep(0.5)
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
    assert not state.exists()
    # the DRAM tier's own redis-server went with it
    redis = subprocess.run(["pgrep", "-f", f"redis-server.*:{base + 9}"], capture_output=True, text=True)
    assert redis.stdout.strip() == ""


def test_up_fails_clearly_without_a_store(tmp_path):
    res = m2cache("up", "--store-root", str(tmp_path), "--model", "missing", timeout=60)
    assert res.returncode == 2 and "no converted store 'missing'" in res.stderr
    assert os.listdir(tmp_path) == []
