"""C libraries built on the user's machine at first use, loaded with ctypes.

Each library is one ``.c`` file shipped with the package that calls it (model/kernels:
the FFN, qcopy and band-selection kernels; codec: CRC-32C of many spans). ``load``
compiles it once per source (with the headers beside it and those it includes by a
quoted relative path, e.g. codec/crc32c.h), flags and compiler into
``$M2CACHE_KERNEL_CACHE`` (default ``~/.cache/m2cache/kernels``), atomically, with OpenMP and the instruction
sets /proc/cpuinfo lists (never -march=native: this VM's cpuid promises more than it
runs), checks its ABI version and sets its functions' argument types. It returns
None where no compiler works, the ABI is stale, or ``M2CACHE_KERNELS=torch`` asks
for the pure-Python/torch paths; every caller has one.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_lock = threading.Lock()
_libs: dict[Path, ctypes.CDLL | None] = {}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compile_flags() -> list[str]:
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-std=gnu11"]
    cpu = _cpu_flags()
    if {"avx2", "fma", "f16c"} <= cpu:
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if "sse4_2" in cpu:
        flags += ["-msse4.2"]
    return flags


def _cache_dir() -> Path:
    return Path(os.environ.get("M2CACHE_KERNEL_CACHE", Path.home() / ".cache" / "m2cache" / "kernels"))


def _build(source: Path, libs: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` (once per source + flags + compiler) into the kernel cache; atomic.
    ``libs``: system libraries it links (``crypto``: -lcrypto)."""
    cc = os.environ.get("CC", "cc")
    flags = _compile_flags()
    link = [f"-l{lib}" for lib in libs]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    headers = b"".join(h.read_bytes() for h in _headers(source))  # what the source may include
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(flags + link).encode()
                         + version.encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *flags, str(source), "-o", str(out), *link, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr[-2000:]}")
        os.replace(out, target)
    log.info("built kernel %s: %s (%s)", source.stem, target, " ".join(flags))
    return target


def _headers(source: Path) -> list[Path]:
    """The headers beside ``source`` and those its ``#include "..."`` lines name (one level)."""
    named = re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read_text(), flags=re.M)
    found = set(source.parent.glob("*.h")) | {(source.parent / n).resolve() for n in named}
    return sorted(h for h in found if h.is_file())


def load(source: Path, abi_symbol: str, abi_version: int, functions: dict[str, list],
         libs: tuple[str, ...] = (), restypes: dict | None = None) -> ctypes.CDLL | None:
    """The library built from ``source`` (cached per process), or None (see the module doc).
    ``functions``: name -> argtypes; those not named ``*_supported`` return void unless
    ``restypes`` names their result type."""
    source = Path(source)
    with _lock:
        if source in _libs:
            return _libs[source]
        _libs[source] = None
        if os.environ.get("M2CACHE_KERNELS", "auto") == "torch":
            log.info("M2CACHE_KERNELS=torch: %s runs on its fallback", source.stem)
            return None
        try:
            lib = ctypes.CDLL(str(_build(source, libs)))
        except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
            log.warning("no C kernel %s (%s): the slower fallback runs", source.stem, err)
            return None
        abi = getattr(lib, abi_symbol)()
        if abi != abi_version:
            log.warning("stale kernel %s ABI %d (want %d): fallback", source.stem, abi, abi_version)
            return None
        for function, argtypes in functions.items():
            getattr(lib, function).argtypes = argtypes
            if restypes and function in restypes:
                getattr(lib, function).restype = restypes[function]
            elif not function.endswith("_supported"):
                getattr(lib, function).restype = None
        _libs[source] = lib
        return lib
