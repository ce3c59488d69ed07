"""Freed weight-sized buffers leave the resident set (local/memory.py), in a fresh process."""
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import sys, torch
    from m2cache.local.memory import return_freed_memory
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) << 10
    if sys.argv[1] == "fixed":
        assert return_freed_memory()
    big = torch.ones(8 << 20, dtype=torch.uint8)  # freeing one mapped block raises glibc's threshold
    del big
    base = rss()
    blocks = [torch.ones(600 << 10, dtype=torch.uint8) for _ in range(64)]  # 37.5 MiB of q/k/v-sized tensors
    fused = torch.ones(600 << 10, dtype=torch.uint8)  # allocated after them (the fused copy) and kept
    held = rss()
    del blocks
    print(base, held, rss())
""")


def _run(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return tuple(int(v) for v in out.stdout.split())


def test_freed_buffers_return_to_the_os():
    base, held, after = _run("fixed")
    assert held - base > 30 << 20  # the blocks were resident
    assert after - base < 4 << 20, f"{(after - base) >> 20} MiB stayed resident after the free"


def test_without_it_glibc_keeps_them():
    """The default behaviour the fix exists for (glibc): the same frees stay resident."""
    base, held, after = _run("default")
    assert held - base > 30 << 20
    assert after - base > 30 << 20


TRIM_PROBE = textwrap.dedent("""
    import sys, threading, numpy as np
    from m2cache.local.memory import return_freed_memory, trim_freed_memory
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) << 10
    assert return_freed_memory()
    out = []
    def load():  # as a model load on the compute thread: staging copies under the mmap threshold,
        base = rss()  # freed between the buffers kept, in the thread's own arena
        kept, staging = [], []
        for _ in range(96):
            staging.append(np.ones(200 << 10, np.uint8))
            kept.append(np.ones(200 << 10, np.uint8))
        held = rss()
        del staging
        freed = rss()
        if sys.argv[1] == "trim":
            assert trim_freed_memory()
        out.extend([base, held, freed, rss()])
        del kept
    t = threading.Thread(target=load)
    t.start(); t.join()
    print(*out)
""")


def test_trim_hands_back_the_staging_copies_a_load_freed_between_kept_buffers():
    """Buffers under the mmap threshold come from a heap; freeing every other one leaves
    the heap's top where it was, so their pages stay resident until trim_freed_memory."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", TRIM_PROBE, mode], capture_output=True, text=True, check=True)
        return [int(v) for v in out.stdout.split()]

    base, held, freed, after = run("keep")
    assert held - base > 30 << 20 and freed - base > 30 << 20  # 37.5 MiB: the frees alone return nothing
    assert after - base > 30 << 20
    base, held, freed, after = run("trim")
    assert held - base > 30 << 20 and freed - base > 30 << 20
    assert after - base < 24 << 20, f"{(after - base) >> 20} MiB resident after the trim (the kept half is 18.75)"
