"""The supervisor with real child processes: started in order with readiness
waits, a dead child reaped at once (no zombie) and restarted with a backoff that
doubles, stopped in reverse order, and children that die with the supervising
process even when it is killed with SIGKILL (PR_SET_PDEATHSIG)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from m2cache.errors import FailedPrecondition
from m2cache.stack import pid_alive
from m2cache.supervisor import ChildSpec, Supervisor
from tiers import wait_for

SLEEPER = (sys.executable, "-c", "import time, signal, sys; "
           "signal.signal(signal.SIGTERM, lambda *a: (print('term', flush=True), sys.exit(0))); "
           "print('ready', flush=True); time.sleep(600)")


def logged_ready(child) -> bool:
    """Ready once the child says so (its SIGTERM handler is installed by then)."""
    return "ready" in child.spec.log_path.read_text().split("--- m2cache up: restart")[-1]


def spec(tmp_path: Path, name: str, argv=SLEEPER, ready=logged_ready) -> ChildSpec:
    return ChildSpec(name, argv, tmp_path / f"{name}.log", ready)


def state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_start_order_restart_backoff_and_reaping(tmp_path):
    order = []

    def ready(name):
        return lambda child: logged_ready(child) and (order.append(name) or True)

    sup = Supervisor(backoff_s=0.3, max_backoff_s=2.0, stable_s=60, poll_s=0.05, grace_s=5)
    sup.start([spec(tmp_path, "a", ready=ready("a")), spec(tmp_path, "b", ready=ready("b"))])
    try:
        assert order == ["a", "b"]
        first = sup.pids()["b"]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: state_of(first) == "gone", 5, "the killed child to be reaped (no zombie)")
        wait_for(lambda: sup.pids().get("b") not in (None, first), 10, "b to be restarted")
        second = sup.pids()["b"]
        killed_at = time.monotonic()
        os.kill(second, signal.SIGKILL)  # a quick second death: the backoff has doubled to 0.6 s
        wait_for(lambda: sup.pids().get("b") not in (None, second), 10, "b to be restarted again")
        assert time.monotonic() - killed_at >= 0.5
        assert sup.children["b"].restarts == 2 and sup.children["a"].restarts == 0
        assert "restart 2 of b" in (tmp_path / "b.log").read_text()
    finally:
        sup.stop()
    assert not any(pid_alive(p) for p in (first, second))
    assert all(c.proc.poll() is not None for c in sup.children.values())
    assert "term" in (tmp_path / "a.log").read_text()  # stopped with SIGTERM, gracefully


def test_no_restart_mode_and_failed_start_stops_the_others(tmp_path):
    sup = Supervisor(restart=False, poll_s=0.05)
    sup.start([spec(tmp_path, "a")])
    pid = sup.pids()["a"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert "a" not in sup.pids() and state_of(pid) == "gone"
    sup.stop()

    sup = Supervisor(poll_s=0.05, start_timeout_s=5)
    with pytest.raises(FailedPrecondition, match="b exited with 3"):
        sup.start([spec(tmp_path, "a2"), spec(tmp_path, "b", argv=(sys.executable, "-c", "raise SystemExit(3)"),
                                              ready=lambda child: False)])
    assert sup.children["a2"].proc.poll() is not None  # a2 was stopped when b failed


def test_children_die_with_a_killed_supervisor(tmp_path):
    """`m2cache up` killed with SIGKILL: its children get SIGTERM from the kernel."""
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from m2cache.supervisor import ChildSpec, Supervisor
        ready = lambda child: "ready" in child.spec.log_path.read_text()
        sup = Supervisor(poll_s=0.05)
        sup.start([ChildSpec("c", {SLEEPER!r}, Path({str(tmp_path / 'c.log')!r}), ready)])
        Path({str(pid_file)!r}).write_text(str(sup.pids()["c"]))
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_for(pid_file.exists, 30, "the child to start")
        child = int(pid_file.read_text())
        assert pid_alive(child)
        parent.kill()
        parent.wait()
        wait_for(lambda: not pid_alive(child) or state_of(child) == "Z", 10, "the orphan to die")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert "term" in (tmp_path / "c.log").read_text()
