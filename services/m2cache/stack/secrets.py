"""``m2cache up --secure``'s material under ``<run_dir>/secure`` (made once, reused
while valid): a CA, one certificate per service and one for clients, an API key,
and the data plane's secrets (a MAC key for records in shared tiers, Redis'
password). This module is the one place that says which service gets which
secret as which flag."""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets as pyrandom
from dataclasses import dataclass
from pathlib import Path

from m2cache import pki
from m2cache.commands.certs import ensure_api_key, hosts_for
from m2cache.security import SecurityConfig

log = logging.getLogger(__name__)

CERT_NAMES = ("store", "dram", "ranker", "worker", "gateway", "client")

# Data-plane secrets, by the config field that takes the file's path (DramConfig and
# WorkerConfig: ``--mac-key-file``, ``--redis-password-file``). A field a service's config
# does not have is skipped (and reported by ``unused_data_plane_secrets``).
DATA_PLANE_SECRETS = {
    "mac_key_file": "mac_key",              # HMAC-SHA256 key sealing every record in Redis (dram/dataplane.py)
    "redis_password_file": "redis_password",  # Redis AUTH password (the stack's Redis gets it via requirepass)
}


@dataclass(frozen=True, slots=True)
class Secrets:
    directory: Path
    ca: pki.CertPair
    certs: dict[str, pki.CertPair]
    api_keys: Path
    mac_key: Path
    redis_password: Path

    def service_security(self, service: str) -> SecurityConfig:
        """What ``m2cache serve <service>`` gets: its own certificate for mTLS; the worker
        and the gateway also demand API keys; the gateway sends one to the workers."""
        pair = self.certs[service]
        keys = str(self.api_keys) if service in ("worker", "gateway") else ""
        token = str(self.api_keys) if service == "gateway" else ""
        return SecurityConfig(tls_cert=str(pair.cert), tls_key=str(pair.key), tls_ca=str(self.ca.cert),
                              api_keys_file=keys, token_file=token)

    def client_security(self) -> SecurityConfig:
        """The CLI's and tests' identity: the client certificate and the API key."""
        pair = self.certs["client"]
        return SecurityConfig(tls_cert=str(pair.cert), tls_key=str(pair.key), tls_ca=str(self.ca.cert),
                              token_file=str(self.api_keys))

    def data_plane_args(self, config_cls) -> dict[str, str]:
        """Field -> secret file path, for the data-plane secret fields ``config_cls`` has."""
        have = {f.name for f in dataclasses.fields(config_cls)}
        return {name: str(getattr(self, attr)) for name, attr in DATA_PLANE_SECRETS.items() if name in have}


def unused_data_plane_secrets(config_classes) -> list[str]:
    """Data-plane secrets no service takes yet (the stack then warns at start)."""
    have = {f.name for cls in config_classes for f in dataclasses.fields(cls)}
    return [name for name in DATA_PLANE_SECRETS if name not in have]


def _random_file(path: Path, nbytes: int) -> Path:
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pyrandom.token_hex(nbytes) + "\n")
    return path


def make_secrets(run_dir: Path, host: str) -> Secrets:
    """Make (or reuse) every secret of a secure stack under ``run_dir/secure``."""
    directory = Path(run_dir).resolve() / "secure"
    extra = [] if host in ("127.0.0.1", "localhost") else [host]
    ca, certs = pki.ensure(directory, {name: hosts_for(name, extra, "") for name in CERT_NAMES})
    return Secrets(directory, ca, certs, ensure_api_key(directory / "api-keys"),
                   _random_file(directory / "mac-key", 32), _random_file(directory / "redis-password", 24))
