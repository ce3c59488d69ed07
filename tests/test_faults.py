"""Fault drills on a real local stack (Redis, store, DRAM tier, ranker, two
workers, gateway, as supervised processes on loopback): kill -9 one process while
a generation streams. Each request either finishes with exactly the tokens of an
undisturbed run or ends with a typed error within its deadline, after only
correct tokens; the supervisor reaps the dead process, restarts it, and service
is back. Every process is stopped by PID at the end."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest

from m2cache.stack import Stack, StackConfig, pid_alive
from m2cache_client import Client, M2CacheClientError
from m2cache_client.client import Progress
from stack_helpers import free_base_port, proc_state
from tiers import wait_for

MODEL = "tinystories-656k"
PROMPT = "Once upon a time"
NUM_TOKENS = 160      # long enough to be mid-stream when the kill lands
KILL_AFTER = 8        # tokens received before the kill
DEADLINE_S = 120.0    # the client's deadline of one request


@pytest.fixture(scope="module")
def stack(store_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    config = StackConfig(store_root=store_root, model=MODEL, num_workers=2, base_port=free_base_port(2),
                         run_dir=tmp, log_dir=tmp / "logs", state_file=tmp / "stack.json",
                         overrides={"worker": {"fetch_deadline_s": 60.0}, "dram": {"redis_probe_interval_s": 0.1}})
    s = Stack(config)
    s.start()
    yield s
    pids = s.pids()
    s.stop()
    assert not [name for name, pid in pids.items() if pid_alive(pid)], "a process outlived the stack"


@pytest.fixture(scope="module")
def reference(stack):
    """The undisturbed run's tokens (greedy, so every worker gives the same)."""
    with Client(stack.config.worker_targets(), model=MODEL, timeout_s=DEADLINE_S) as c:
        return c.generate(PROMPT, max_new_tokens=NUM_TOKENS).token_ids


def gateway_health(stack) -> int:
    try:
        with urllib.request.urlopen(f"http://{stack.config.target('gateway')}/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def stream_with_kill(stack, victim: str):
    """Stream from worker-0 first (the client's round-robin starts there) and kill
    ``victim`` after KILL_AFTER tokens. Returns (tokens, error, seconds, killed pid)."""
    progress, tokens, error = Progress(), [], None
    victim_pid = stack.pids()[victim]
    start = time.monotonic()
    with Client(stack.config.worker_targets(), model=MODEL, timeout_s=DEADLINE_S) as c:
        try:
            for token in c.stream(PROMPT, max_new_tokens=NUM_TOKENS, progress_out=progress):
                if token.id >= 0:
                    tokens.append(token.id)
                if len(tokens) == KILL_AFTER:
                    os.kill(victim_pid, signal.SIGKILL)
        except M2CacheClientError as err:  # typed, by the client library's contract
            error = err
    return tokens, error, time.monotonic() - start, victim_pid


def restored(stack, victim: str, old_pid: int, reference) -> None:
    wait_for(lambda: proc_state(old_pid) == "gone", 10, f"{victim} (pid {old_pid}) to be reaped, not a zombie")
    wait_for(lambda: stack.pids().get(victim) not in (None, old_pid), 30, f"{victim} to be restarted")
    new_pid = stack.pids()[victim]
    assert json.loads(stack.config.state_file.read_text())["pids"][victim] == new_pid  # state file follows
    spec = stack.supervisor.children[victim].spec
    wait_for(lambda: spec.ready(stack.supervisor.children[victim]), 120, f"{victim} to serve again", poll_s=0.5)
    with Client(stack.config.worker_targets(), model=MODEL, timeout_s=DEADLINE_S) as c:
        assert c.generate(PROMPT, max_new_tokens=NUM_TOKENS).token_ids == reference
    wait_for(lambda: gateway_health(stack) == 200, 30, "the gateway to be ready again", poll_s=0.5)


@pytest.mark.parametrize("victim", ["redis", "store", "dram", "worker-0"])
def test_kill_mid_generation(stack, reference, victim):
    assert len(reference) > 4 * KILL_AFTER and gateway_health(stack) == 200  # (it may end at EOS)
    seen_unready = threading.Event()
    if victim == "dram":  # the gateway's readiness follows its tiers
        def watch():
            end = time.monotonic() + 20
            while time.monotonic() < end and not seen_unready.is_set():
                if gateway_health(stack) == 503:
                    seen_unready.set()
                time.sleep(0.2)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    tokens, error, seconds, old_pid = stream_with_kill(stack, victim)
    assert tokens == reference[:len(tokens)], "a wrong token was returned"  # never anything wrong
    if error is None:
        assert tokens == reference, f"finished early without an error after a kill of {victim}"
    else:
        assert seconds <= DEADLINE_S + 5, f"{type(error).__name__} after {seconds:.0f}s, past the deadline"
    if victim == "dram":
        watcher.join()
        assert seen_unready.is_set(), "gateway /health stayed 200 with its DRAM tier dead"
    restored(stack, victim, old_pid, reference)
