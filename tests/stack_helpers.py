"""Helpers for tests that run the whole stack as processes (`m2cache up` or
:class:`m2cache.stack.Stack`): a free block of ports, process states."""
from __future__ import annotations

from pathlib import Path

from m2cache.stack.config import free_base_port

__all__ = ["free_base_port", "proc_state"]


def proc_state(pid: int) -> str:
    """The kernel's state letter of ``pid`` ("Z" = zombie), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
