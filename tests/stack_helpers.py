"""Helpers for tests that run the whole stack as processes (`m2cache up` or
:class:`m2cache.stack.Stack`): a free block of ports, process states, stopping an
`m2cache up` that may hang."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from m2cache.stack.config import free_base_port

__all__ = ["free_base_port", "proc_state", "stop_up"]


def stop_up(up: subprocess.Popen, timeout: float) -> str:
    """SIGINT to an `m2cache up` process and its output once it exits. One that has not
    exited after ``timeout`` seconds is killed (its children get SIGTERM from the
    kernel: the supervisor sets PR_SET_PDEATHSIG), so a hung start never leaves the
    stack running after the test; the test then fails saying so."""
    up.send_signal(signal.SIGINT)
    try:
        return up.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        up.kill()
        out = up.communicate()[0]
        raise AssertionError(f"m2cache up did not stop {timeout:.0f} s after SIGINT (killed):\n{out}") from None


def proc_state(pid: int) -> str:
    """The kernel's state letter of ``pid`` ("Z" = zombie), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
