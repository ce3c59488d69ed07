"""Helpers for tests that run the whole stack as processes (`m2cache up` or
:class:`m2cache.stack.Stack`): a free block of ports, process states."""
from __future__ import annotations

import random
import socket
from pathlib import Path

from m2cache.stack.config import PORTS


def free_base_port(num_workers: int = 2) -> int:
    """A base port whose every stack offset is free on loopback now."""
    offsets = [PORTS[s] for s in ("store", "dram", "ranker", "redis", "gateway")]
    offsets += [PORTS["worker"] + i for i in range(num_workers)]
    for _ in range(200):
        base = random.randrange(20000, 60000, 100)
        if all(_free(base + o) for o in offsets):
            return base
    raise RuntimeError("no free block of ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def proc_state(pid: int) -> str:
    """The kernel's state letter of ``pid`` ("Z" = zombie), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
