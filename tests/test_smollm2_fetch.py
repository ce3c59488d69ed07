"""scripts/fetch_models.py: SmolLM2 lands in the cache outside the checkout,
checksum-verified, and a second fetch reuses it (idempotent)."""
from __future__ import annotations

import subprocess
import sys

from smollm2 import REPO, _fetch_module, smollm2_gguf


def test_fetch_is_idempotent_and_outside_the_checkout():
    path = smollm2_gguf()
    fetch = _fetch_module()
    assert fetch.intact(path) and fetch.sha256(path) == fetch.SHA256
    assert REPO not in path.parents  # never inside the repository
    before = path.stat().st_mtime_ns
    assert fetch.fetch_smollm2(quiet=True) == path and path.stat().st_mtime_ns == before  # reused, not re-fetched
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_models.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == str(path)


def test_check_reports_a_missing_cache(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_models.py"), "--check"],
                         capture_output=True, text=True, timeout=120, env={"M2CACHE_CACHE_DIR": str(tmp_path)})
    assert res.returncode == 1 and "missing or damaged" in res.stderr
    assert list(tmp_path.iterdir()) == []  # --check writes nothing
