"""Bind a child process's memory to one NUMA node: how a CXL memory expander
(a CPU-less NUMA node, CENT) becomes a memory tier for the DRAM tier's Redis.

``bind_command(argv, node)`` returns the command line to start instead:
``numactl --membind=N argv...`` when Debian's numactl is installed, else
``python -m m2cache.dram.numa N argv...``, which sets the same policy
(MPOL_BIND) with the set_mempolicy syscall and then execs ``argv`` in place, so
the PID stays the child's. The policy survives exec; ``/proc/<pid>/numa_maps``
shows it ("bind:N") on every mapping.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import sys
from pathlib import Path

from m2cache.errors import FailedPrecondition

NODES = Path("/sys/devices/system/node")
MPOL_BIND = 2
_SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237, "arm64": 237, "ppc64le": 261, "s390x": 237}


def _parse_list(text: str) -> list[int]:
    """Kernel cpu/node list syntax ("0", "0-3,5") -> sorted ids."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)


def memory_nodes(root: Path = NODES) -> list[int]:
    """NUMA nodes that have memory (local DRAM and CPU-less CXL nodes alike)."""
    for name in ("has_memory", "online"):
        if (root / name).is_file():
            return _parse_list((root / name).read_text())
    return [0]  # no NUMA sysfs (not Linux, or NUMA off): one node


def check_node(node: int, root: Path = NODES) -> None:
    """FailedPrecondition unless ``node`` is a NUMA node with memory on this machine."""
    nodes = memory_nodes(root)
    if node not in nodes:
        raise FailedPrecondition(f"NUMA node {node} does not exist or has no memory on this machine "
                                 f"(nodes with memory: {', '.join(map(str, nodes))}; see numactl --hardware)")


def bind_command(argv: list[str], node: int) -> list[str]:
    """The command that runs ``argv`` with its memory bound to ``node``."""
    check_node(node)
    numactl = shutil.which("numactl")
    if numactl:
        return [numactl, f"--membind={node}", "--", *argv]
    return [sys.executable, "-m", "m2cache.dram.numa", str(node), *argv]


def set_mempolicy_bind(node: int) -> None:
    """MPOL_BIND this process's future allocations to ``node`` (OSError on failure)."""
    number = _SYS_SET_MEMPOLICY.get(platform.machine())
    if number is None:
        raise OSError(f"set_mempolicy: unknown syscall number on {platform.machine()}")
    mask = ctypes.c_ulong(1 << node)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, MPOL_BIND, ctypes.byref(mask), ctypes.sizeof(mask) * 8 + 1) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"set_mempolicy(MPOL_BIND, node {node}): {os.strerror(err)}")


def bound_nodes(pid: int) -> set[int]:
    """Nodes named by the "bind:" policies in ``/proc/<pid>/numa_maps`` (empty: not bound)."""
    out: set[int] = set()
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        fields = line.split()
        if len(fields) > 1 and fields[1].startswith("bind:"):
            out.update(_parse_list(fields[1][len("bind:"):]))
    return out


def main(args: list[str]) -> None:
    """``python -m m2cache.dram.numa NODE CMD ARGS...``: bind, then exec CMD in place."""
    if len(args) < 2:
        sys.exit("usage: python -m m2cache.dram.numa NODE COMMAND [ARGS...]")
    node = int(args[0])
    check_node(node)
    set_mempolicy_bind(node)
    os.execvp(args[1], args[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
