"""``m2cache certs --out DIR``: a local CA and one certificate per service (store,
dram, ranker, worker, gateway, and "client" for CLIs), each valid as server and
client certificate (mTLS), plus an API key. Existing files are reused while
valid; ``--force`` makes everything anew.

Each certificate names ``localhost``, ``127.0.0.1``, the service's own name (the
compose service name) and, with ``--k8s-namespace NS``, its Kubernetes Service
names (``m2cache-<service>``, ``m2cache-<service>.NS.svc[.cluster.local]``).
``--k8s-secrets FILE`` also writes the Kubernetes Secrets the manifests in
deploy/k8s mount (``m2cache-tls-<service>``: ca.crt, tls.crt, tls.key; and
``m2cache-api-keys``: api-keys) -- apply them with ``kubectl apply -f FILE``."""
from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
from pathlib import Path

import yaml

from m2cache import pki

SERVICES = ("store", "dram", "ranker", "worker", "gateway", "client")
ALIASES = {"worker": ["worker-cpu"]}  # compose's CPU worker service answers for "worker"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("certs", help="make a local CA, per-service certificates and an API key",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for the CA, certificates and keys")
    p.add_argument("--host", action="append", default=[], help="extra DNS name or IP in every certificate (repeat)")
    p.add_argument("--k8s-namespace", default="", help="add the Kubernetes Service names in this namespace")
    p.add_argument("--k8s-secrets", type=Path, default=None, help="also write Kubernetes Secret manifests here")
    p.add_argument("--force", action="store_true", help="make a new CA and certificates even if valid ones exist")
    return p


def hosts_for(service: str, extra: list[str], namespace: str) -> list[str]:
    hosts = ["localhost", "127.0.0.1", service, *ALIASES.get(service, []), *extra]
    if namespace:
        svc = f"m2cache-{service}"
        hosts += [svc, f"{svc}.{namespace}", f"{svc}.{namespace}.svc", f"{svc}.{namespace}.svc.cluster.local"]
    return list(dict.fromkeys(hosts))


def ensure_api_key(path: Path) -> Path:
    """A random API key file (0600), kept if it exists."""
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"m2c-{secrets.token_urlsafe(32)}\n")
    return path


def make(out: Path, extra_hosts: list[str] = (), namespace: str = "", force: bool = False
         ) -> tuple[pki.CertPair, dict[str, pki.CertPair], Path]:
    """(CA, service -> pair, API key file) under ``out``."""
    if force and out.exists():
        shutil.rmtree(out)
    names = {s: hosts_for(s, list(extra_hosts), namespace) for s in SERVICES}
    ca, pairs = pki.ensure(out, names)
    return ca, pairs, ensure_api_key(out / "api-keys")


def k8s_secrets(ca: pki.CertPair, pairs: dict[str, pki.CertPair], api_keys: Path, namespace: str) -> str:
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    docs = [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": f"m2cache-tls-{name}", "namespace": namespace},
             "data": {"ca.crt": b64(ca.cert), "tls.crt": b64(pair.cert), "tls.key": b64(pair.key)}}
            for name, pair in pairs.items() if name != "client"]
    docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                 "metadata": {"name": "m2cache-api-keys", "namespace": namespace},
                 "data": {"api-keys": b64(api_keys)}})
    return yaml.safe_dump_all(docs, sort_keys=False)


def main(args: argparse.Namespace) -> int:
    ca, pairs, keys = make(args.out, args.host, args.k8s_namespace, args.force)
    print(f"CA {ca.cert}")
    for name, pair in pairs.items():
        print(f"{name:8s} {pair.cert} {pair.key}")
    print(f"API key file {keys}")
    if args.k8s_secrets:
        fd = os.open(args.k8s_secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(k8s_secrets(ca, pairs, keys, args.k8s_namespace or "m2cache"))
        print(f"Kubernetes Secrets {args.k8s_secrets} (kubectl apply -f {args.k8s_secrets})")
    return 0
