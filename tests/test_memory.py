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
