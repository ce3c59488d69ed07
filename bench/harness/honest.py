"""Keeping the SSD tier honest: the page cache must not serve "SSD" reads.

Two tools, both used (and reported) by the benchmark:
- ``drop_caches()``: ``sync; echo 3 > /proc/sys/vm/drop_caches`` (root) before a
  measured phase, falling back to ``posix_fadvise(DONTNEED)`` on given files;
- ``MemoryLimit``: a cgroup v1 memory group under this process's own group; a
  process moved into it has its page cache capped at the limit, so a model
  larger than the allowance cannot stay cached between tokens.
And the proof: ``device_read_bytes(pid)`` (``/proc/<pid>/io`` read_bytes) is
what the process really fetched from the block device, next to the bytes the
system asked its SSD tier for.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


def drop_caches(files: list[Path] = ()) -> str:
    """Empty the page cache; returns how ("drop_caches" or "fadvise")."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def _proc_field(pid: int, filename: str, field: str) -> int:
    for line in Path(f"/proc/{pid}/{filename}").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def device_read_bytes(pid: int | None = None) -> int:
    """Bytes ``pid`` (default: this process) caused to be read from the block device."""
    return _proc_field(pid or os.getpid(), "io", "read_bytes")


def anon_bytes(pid: int | None = None) -> int:
    """Anonymous resident memory of ``pid`` (RssAnon): what a memory limit cannot reclaim."""
    return _proc_field(pid or os.getpid(), "status", "RssAnon") * 1024


def peak_rss_bytes(pid: int | None = None) -> int:
    """High-water resident set (VmHWM) of ``pid``."""
    return _proc_field(pid or os.getpid(), "status", "VmHWM") * 1024


_CODE = re.compile(r"\.so(\.[0-9.]+)?$|/python[0-9.]*$")


def code_rss_bytes(pid: int | None = None) -> int:
    """Resident pages of shared libraries and the interpreter binary mapped by ``pid``:
    code (libtorch alone is 400 MB of text) faulted in as it first runs, the
    runtime's whatever the system, not its data. The store's files never match."""
    total, code = 0, False
    for line in Path(f"/proc/{pid or os.getpid()}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            code = len(head) == 6 and bool(_CODE.search(head[5].strip()))
        elif code and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def _own_memory_group() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_MEMORY / path.lstrip("/")
    return None


class MemoryLimit:
    """One cgroup v1 memory group (created under ours, removed by ``close``)."""

    def __init__(self, name: str):
        parent = _own_memory_group()
        if parent is None or not os.access(parent, os.W_OK):
            raise PermissionError("no writable cgroup v1 memory controller")
        self.path = parent / name
        self.path.mkdir(exist_ok=True)
        self.parent = parent

    @classmethod
    def available(cls) -> bool:
        group = _own_memory_group()
        return group is not None and os.access(group, os.W_OK)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def set_limit(self, nbytes: int) -> None:
        """Cap memory + page cache of the group's processes (reclaims cache at once)."""
        (self.path / "memory.limit_in_bytes").write_text(f"{int(nbytes)}\n")

    def read(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def stat(self) -> dict[str, int]:
        pairs = (line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        return {k: int(v) for k, v in pairs}

    def close(self) -> None:
        """Move leftover processes to the parent group and remove ours."""
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                (self.parent / "cgroup.procs").write_text(f"{pid}\n")
            self.path.rmdir()
        except OSError as err:
            log.warning("could not remove %s: %s", self.path, err)


def cap_page_cache(group: MemoryLimit, pids: list[int], headroom_bytes: int) -> int:
    """Limit ``group`` to its processes' (``pids``) anonymous memory now plus
    ``headroom_bytes`` (working temporaries and at most that much page cache). Returns the limit."""
    limit = sum(anon_bytes(pid) for pid in pids) + headroom_bytes
    group.set_limit(limit)
    return limit
