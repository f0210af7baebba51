"""TLS material: the development certificate and loading operator certificates.

Files (REFERENCE §1): ``data/server-cert.der`` and ``data/server-key.der``; PEM copies
(``server-cert.pem``, ``server-key.pem``) are written next to them for clients and tools.
Operator files may be DER or PEM; a PEM certificate file may hold the whole chain (leaf
first, then intermediates, as ACME clients write ``fullchain.pem``), and the server sends
all of it.

The development certificate is a leaf signed by a throwaway development CA (``ca-cert.pem``)
whose private key is never written: WebPKI-style verifiers (rustls, which the reference
system's clients use; qh3) refuse a CA certificate as the server's own (``CaUsedAsEndEntity``),
and qh3 does not take a self-issued certificate that carries ``serverAuth`` as a trust
anchor, so a single self-signed certificate cannot serve every client.  ``server-cert.pem``
holds the leaf followed by the CA, so trusting either PEM file works.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qpc_core.errors import ConfigError

log = logging.getLogger("qpc.tls")

DEV_CERT_DER = "server-cert.der"
DEV_KEY_DER = "server-key.der"
DEV_CERT_PEM = "server-cert.pem"
DEV_KEY_PEM = "server-key.pem"
DEV_CA_PEM = "ca-cert.pem"
DEV_CA_DER = "ca-cert.der"
DEV_SERVER_CN = "qpc development server"
DEV_CA_CN_PREFIX = "qpc development CA "
EXPIRY_WARNING = dt.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    certificate: x509.Certificate
    private_key: CertificateIssuerPrivateKeyTypes
    cert_path: Path
    #: Intermediate certificates sent after the leaf (from a PEM chain file), in order.
    chain: tuple[x509.Certificate, ...] = field(default=())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def generate_self_signed(
    out_dir: Path,
    *,
    hostnames: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1", "::1"),
    days: int = 365,
) -> tuple[Path, Path]:
    """Write a development certificate: an ECDSA P-256 server certificate (DER + PEM) issued
    by a new development CA (``ca-cert.pem`` / ``.der``; its key is discarded, so nothing can
    issue further certificates under it).  Return (cert_der, key_der)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    # A distinct name per CA, so several trusted development CAs are told apart.
    ca_cn = f"{DEV_CA_CN_PREFIX}{secrets.token_hex(4)}"
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_cn)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEV_SERVER_CN)])
    san: list[x509.GeneralName] = []
    for h in hostnames:
        h = h.strip()
        if not h:
            raise ConfigError("gen-cert: an empty host name cannot go in a certificate")
        try:  # an address given as a host name: clients match it as an IP address
            san.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
        except ValueError:
            san.append(x509.DNSName(h))
    san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    san = list(dict.fromkeys(san))  # no duplicates (an IP given both ways)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    del ca_key
    pem = serialization.Encoding.PEM
    der = serialization.Encoding.DER
    cert_der = out_dir / DEV_CERT_DER
    key_der = out_dir / DEV_KEY_DER
    write_atomic(out_dir / DEV_CA_DER, ca.public_bytes(der), 0o644)
    write_atomic(out_dir / DEV_CA_PEM, ca.public_bytes(pem), 0o644)
    write_atomic(cert_der, cert.public_bytes(der), 0o644)
    write_atomic(out_dir / DEV_CERT_PEM, cert.public_bytes(pem) + ca.public_bytes(pem), 0o644)
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
    write_atomic(key_der, key_bytes_der, 0o600)
    write_atomic(out_dir / DEV_KEY_PEM, key_bytes_pem, 0o600)
    return cert_der, key_der


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_certificate(path: Path, what: str = "tls_cert") -> x509.Certificate:
    """The first (leaf) certificate of a DER or PEM file (``what``: its config key)."""
    return load_certificate_chain(path, what)[0]


def load_certificate_chain(path: Path, what: str = "tls_cert") -> list[x509.Certificate]:
    """Every certificate of the file, leaf first (DER holds exactly one)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config: {what}: cannot read {path}: {e.strerror or e}") from None
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise ConfigError(
            f"config: {what}: {path} is not a DER or PEM certificate: {e}"
        ) from None
    # The PEM reader skips a block it cannot finish: a chain file caught while being written
    # would lose its intermediates without a word.
    begun = len(re.findall(rb"-----BEGIN (?:X509 )?CERTIFICATE-----", data))
    if b"-----BEGIN" in data and begun != len(certs):
        raise ConfigError(
            f"config: {what}: {path} holds {begun} certificate blocks but only {len(certs)} "
            "could be read (cut short or damaged)"
        )
    return certs


def check_valid_now(certificate: x509.Certificate, what: str = "tls_cert") -> None:
    """ConfigError unless ``certificate`` is valid now.  For a reload: the pair in use stays
    rather than being replaced by one every client would refuse (start-up serves what it
    has and logs it, see resolve_tls)."""
    now = dt.datetime.now(dt.UTC)
    if certificate.not_valid_before_utc > now:
        raise ConfigError(f"config: {what}: the certificate is not valid before "
                          f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if certificate.not_valid_after_utc < now:
        raise ConfigError(f"config: {what}: the certificate expired on "
                          f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def load_private_key(path: Path, what: str = "tls_key") -> CertificateIssuerPrivateKeyTypes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config: {what}: cannot read {path}: {e.strerror or e}") from None
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config: {what}: {path} is not a DER or PEM private key: {e}") from None
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
                "generated a development certificate at %s, issued by a one-off development "
                "CA (clients need --ca-cert %s); never use it in production",
                cert,
                data_dir / DEV_CA_PEM,
            )
        elif _is_own_ca(load_certificate(cert)):
            log.warning(
                "the development certificate %s is self-signed as its own CA (made by an older "
                "qpc): rustls- and qh3-based clients refuse it; delete %s/server-* to get a "
                "CA-issued one (clients then trust %s)",
                cert,
                data_dir,
                data_dir / DEV_CA_PEM,
            )
    for label, p in (("tls_cert", cert), ("tls_key", key)):
        if not p.is_file():
            raise ConfigError(f"config: {label}: file not found: {p}")
    certs = load_certificate_chain(cert)
    certificate = certs[0]
    private_key = load_private_key(key)
    check_key_matches(certs, private_key, cert, key)
    if production and is_development_certificate(certificate):
        raise ConfigError(
            f"config: tls_cert: {cert} is a qpc development certificate (`qpc gen-cert` or "
            "generated in a data dir): production needs a certificate from a real CA"
        )
    # Self-signed certificates (roots) are the client's business, not ours to send (they are
    # what the client trusts); send only the leaf's issuers below them.
    chain = tuple(c for c in certs[1:] if c.issuer != c.subject)
    now = dt.datetime.now(dt.UTC)
    for i, c in enumerate((certificate, *chain)):
        what = (
            f"TLS certificate {cert}"
            if i == 0
            else f"intermediate {i} ({c.subject.rfc4514_string()}) in {cert}"
        )
        remaining = c.not_valid_after_utc - now
        if remaining < dt.timedelta(0):
            log.error("%s EXPIRED on %s", what, c.not_valid_after_utc)
        elif remaining < EXPIRY_WARNING:
            log.warning(
                "%s expires in %d days (%s): renew it", what, remaining.days, c.not_valid_after_utc
            )
    return TlsMaterial(certificate, private_key, cert, chain)


def is_development_certificate(cert: x509.Certificate) -> bool:
    """Made by qpc for development (its subject or issuer name says so)."""
    def cn(name: x509.Name) -> str:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else ""

    return cn(cert.subject) == DEV_SERVER_CN or cn(cert.issuer).startswith(DEV_CA_CN_PREFIX)


def _is_own_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca) and cert.issuer == cert.subject


def check_key_matches(
    certs: list[x509.Certificate],
    private_key: CertificateIssuerPrivateKeyTypes,
    cert: Path,
    key: Path,
    what: tuple[str, str] = ("tls_cert", "tls_key"),
) -> None:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    mine = private_key.public_key().public_bytes(der, spki)
    found = [i for i, c in enumerate(certs) if c.public_key().public_bytes(der, spki) == mine]
    if found and found[0] > 0:
        raise ConfigError(
            f"config: {what[0]}: {cert} must start with the server's own certificate (the one "
            f"{key} belongs to is number {found[0] + 1} in the file)"
        )
    if not found:
        raise ConfigError(
            f"config: {what[1]}: {key} is not the private key of the certificate in {cert}"
        )
