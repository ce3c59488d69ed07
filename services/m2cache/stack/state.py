"""The running stack's state file (written by ``m2cache up``): addresses, PIDs,
and in a secure stack the client certificate and API key to use."""
from __future__ import annotations

import json
import os
from pathlib import Path

from m2cache.errors import FailedPrecondition
from m2cache.security import SecurityConfig, read_keys


def read_state(path: Path) -> dict:
    """The running stack's addresses, as ``m2cache up`` wrote them."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FailedPrecondition(f"no running stack: {path} not found (start one with m2cache up)") from None


def state_security(state: dict) -> SecurityConfig:
    """The security setting a client of this stack uses (plaintext for a plain stack)."""
    tls = state.get("tls")
    if not tls:
        return SecurityConfig()
    return SecurityConfig(tls_cert=tls["cert"], tls_key=tls["key"], tls_ca=tls["ca"],
                          token_file=state.get("api_key_file", ""))


def client_kwargs(state: dict) -> dict:
    """Keyword arguments of ``m2cache_client.Client`` for this stack's workers."""
    tls = state.get("tls")
    if not tls:
        return {}
    return {"tls": True, "root_certificates": Path(tls["ca"]).read_bytes(),
            "certificate_chain": Path(tls["cert"]).read_bytes(), "private_key": Path(tls["key"]).read_bytes(),
            "token": read_keys(state["api_key_file"])[0]}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
