"""A private certificate authority for one deployment: a CA and one certificate
per service (usable as server and client certificate, for mTLS), made with the
``cryptography`` package. Keys are ECDSA P-256, written 0600 in a 0700 directory.

Layout of a certificate directory::

    ca.crt ca.key            the CA (keep ca.key off the servers in production)
    <name>.crt <name>.key    one pair per service (and "client" for CLIs and tests)
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest lifetime browsers and most TLS stacks still accept
RENEW_WITHIN = dt.timedelta(days=30)
ORG = "m2cache"


@dataclass(frozen=True, slots=True)
class CertPair:
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: a reader never sees half a key


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries = []
    for h in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def make_ca(directory: Path, common_name: str = "m2cache local CA") -> CertPair:
    """Write a new self-signed CA into ``directory``."""
    key = _new_key()
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    pair = CertPair(directory / "ca.crt", directory / "ca.key")
    _write(pair.key, _key_pem(key), private=True)
    _write(pair.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return pair


def make_cert(ca: CertPair, directory: Path, name: str, hosts: list[str]) -> CertPair:
    """Write ``<name>.crt/.key`` signed by ``ca``, valid for ``hosts`` (DNS names or
    IPs), for both server and client authentication."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    key = _new_key()
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
    _write(pair.key, _key_pem(key), private=True)
    _write(pair.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return pair


def _usable(pair: CertPair, ca_cert: x509.Certificate | None, hosts: list[str]) -> bool:
    """Whether an existing pair can be reused: present, not near expiry, signed by
    ``ca_cert`` (None: self-signed CA) and covering ``hosts``."""
    if not (pair.cert.is_file() and pair.key.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        issuer = ca_cert or cert
        issuer.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    except (ValueError, InvalidSignature, TypeError):
        return False
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        return False
    if cert.not_valid_after_utc - _now() < RENEW_WITHIN:
        return False
    if hosts:
        have = {str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.DNSName)}
        have |= {str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                 .get_values_for_type(x509.IPAddress)}
        if not set(hosts) <= have:
            return False
    return True


def ensure(directory: Path, names: dict[str, list[str]]) -> tuple[CertPair, dict[str, CertPair]]:
    """Make (or reuse) a CA and one certificate per ``names`` entry (name -> hosts)
    under ``directory``. A new CA re-issues every certificate. Returns (ca, pairs)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca = CertPair(directory / "ca.crt", directory / "ca.key")
    fresh_ca = not _usable(ca, None, [])
    if fresh_ca:
        ca = make_ca(directory)
        log.info("made a new CA in %s", directory)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    pairs = {}
    for name, hosts in names.items():
        pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
        if fresh_ca or not _usable(pair, ca_cert, hosts):
            pair = make_cert(ca, directory, name, hosts)
            log.info("issued %s for %s", pair.cert, ", ".join(hosts))
        pairs[name] = pair
    return ca, pairs
