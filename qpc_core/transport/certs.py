"""TLS material: the development self-signed certificate and loading operator certificates.

Files (REFERENCE §1): ``data/server-cert.der`` and ``data/server-key.der``; PEM copies
(``server-cert.pem``, ``server-key.pem``) are written next to them for clients and tools.
Operator files may be DER or PEM.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from qpc_core.errors import ConfigError

log = logging.getLogger("qpc.tls")

DEV_CERT_DER = "server-cert.der"
DEV_KEY_DER = "server-key.der"
DEV_CERT_PEM = "server-cert.pem"
DEV_KEY_PEM = "server-key.pem"
EXPIRY_WARNING = dt.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    certificate: x509.Certificate
    private_key: CertificateIssuerPrivateKeyTypes
    cert_path: Path


def generate_self_signed(
    out_dir: Path,
    *,
    hostnames: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1", "::1"),
    days: int = 365,
) -> tuple[Path, Path]:
    """Write a self-signed ECDSA P-256 certificate (DER + PEM); return (cert_der, key_der)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qpc development server")])
    now = dt.datetime.now(dt.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_der = out_dir / DEV_CERT_DER
    key_der = out_dir / DEV_KEY_DER
    _write(cert_der, cert.public_bytes(serialization.Encoding.DER), 0o644)
    _write(out_dir / DEV_CERT_PEM, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    key_bytes_der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_bytes_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_der, key_bytes_der, 0o600)
    _write(out_dir / DEV_KEY_PEM, key_bytes_pem, 0o600)
    return cert_der, key_der


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_certificate(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise ConfigError(
            f"config: tls_cert: {path} is not a DER or PEM certificate: {e}"
        ) from None


def load_private_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    data = path.read_bytes()
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config: tls_key: {path} is not a DER or PEM private key: {e}") from None
    return key  # type: ignore[return-value]


def resolve_tls(
    data_dir: Path, cert: Path | None, key: Path | None, *, production: bool
) -> TlsMaterial:
    """Operator files when configured; otherwise (dev only) the generated certificate."""
    if cert is None or key is None:
        if production:
            raise ConfigError(
                "config: tls_cert/tls_key: production requires certificate files "
                "(set QPC_TLS_CERT and QPC_TLS_KEY)"
            )
        cert = data_dir / DEV_CERT_DER
        key = data_dir / DEV_KEY_DER
        if not cert.is_file() or not key.is_file():
            generate_self_signed(data_dir)
            log.warning(
                "generated a self-signed development certificate at %s (clients need "
                "--ca-cert %s); never use it in production",
                cert,
                data_dir / DEV_CERT_PEM,
            )
    for label, p in (("tls_cert", cert), ("tls_key", key)):
        if not p.is_file():
            raise ConfigError(f"config: {label}: file not found: {p}")
    certificate = load_certificate(cert)
    private_key = load_private_key(key)
    remaining = certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if remaining < dt.timedelta(0):
        log.error("TLS certificate %s EXPIRED on %s", cert, certificate.not_valid_after_utc)
    elif remaining < EXPIRY_WARNING:
        log.warning(
            "TLS certificate %s expires in %d days (%s): renew it",
            cert,
            remaining.days,
            certificate.not_valid_after_utc,
        )
    return TlsMaterial(certificate, private_key, cert)
