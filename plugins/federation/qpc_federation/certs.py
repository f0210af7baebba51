"""Federation certificates: a private CA for the federation, one certificate per node.

Every node presents the same certificate as a server (on ``federation.listen``) and as a client
(when it calls a peer): ECDSA P-256, the node's domain (and optionally IP addresses) in the
subjectAltName, extended key usage serverAuth + clientAuth, issued by the federation CA that
every node trusts (``federation_ca``).  A peer is accepted when its certificate chains to that
CA and names the domain its requests claim (checked with ``cryptography``'s X.509 verifier).

``qpc-federation-certs ca --out DIR`` makes the CA (keep ``federation-ca-key.der`` offline);
``qpc-federation-certs issue --ca-dir DIR --domain node1.chat.example.com --out DIR`` writes
``federation-cert.der``, ``federation-key.der`` and a copy of ``federation-ca.der``: the three
files the scaling guide's ``[federation]`` example names.

``qpc-federation-certs crl --ca-dir DIR`` writes the CA's certificate revocation list
``federation-crl.der`` again (signed, numbered, current for ``--days``; the first time naming
no one); ``revoke --ca-dir DIR --cert FILE`` (or ``--serial HEX``) adds a node certificate to
it (each run keeps the serials already listed).  Nodes that name it as ``federation_crl`` refuse
those certificates, as peers and as servers they call; SIGHUP reads it again and closes the
connections of certificates it now lists.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qpc_core.config import FederationConfig
from qpc_core.errors import ConfigError
from qpc_core.transport.certs import (
    TlsMaterial,
    check_key_matches,
    load_certificate,
    load_certificate_chain,
    load_private_key,
    write_atomic,
)

log = logging.getLogger("qpc.federation")

CA_CERT = "federation-ca.der"
CA_KEY = "federation-ca-key.der"
NODE_CERT = "federation-cert.der"
NODE_KEY = "federation-key.der"
CRL = "federation-crl.der"
#: How long a CRL written by ``revoke`` is current (its nextUpdate); a node keeps using a
#: CRL past it (a stale list still names what it names) and logs a warning.
CRL_DAYS = 30


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


def _key_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(out: Path, *, name: str = "qpc federation CA", days: int = 3650) -> Path:
    """Write a new federation CA (certificate + private key) into ``out``; refuse to replace
    an existing one (every node certificate issued under it would stop being trusted)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / CA_KEY).exists() or (out / CA_CERT).exists():
        raise ConfigError(f"{out} already holds a federation CA ({CA_CERT}); not replaced")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(out / CA_KEY, _key_der(key), 0o600)
    write_atomic(out / CA_CERT, cert.public_bytes(serialization.Encoding.DER), 0o644)
    return out / CA_CERT


def issue(
    ca_dir: Path, out: Path, domain: str, *, ips: tuple[str, ...] = (), days: int = 825,
) -> Path:
    """Issue a node certificate for ``domain`` under the CA in ``ca_dir``; write it, its key
    and a copy of the CA certificate into ``out``."""
    domain = domain.strip().lower().rstrip(".")
    if not domain:
        raise ConfigError("issue: --domain must not be empty")
    labels = domain.split(".")
    if not all(lab and len(lab) <= 63 and lab.replace("-", "").isalnum() and lab.isascii()
               and not lab.startswith("-") and not lab.endswith("-") for lab in labels):
        raise ConfigError(f"issue: --domain {domain!r} is not a DNS name")
    ca_cert = load_certificate(ca_dir / CA_CERT, "federation CA certificate")
    ca_key = load_private_key(ca_dir / CA_KEY, "federation CA key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / CA_KEY}: expected an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(domain)]
    for ip in ips:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ConfigError(f"issue: --ip {ip!r} is not an IP address") from None
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / NODE_KEY, _key_der(key), 0o600)
    write_atomic(out / NODE_CERT, cert.public_bytes(serialization.Encoding.DER), 0o644)
    if (out / CA_CERT).resolve() != (ca_dir / CA_CERT).resolve():
        write_atomic(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.DER), 0o644)
    return out / NODE_CERT


def _ca_signer(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = load_certificate(ca_dir / CA_CERT, "federation CA certificate")
    ca_key = load_private_key(ca_dir / CA_KEY, "federation CA key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / CA_KEY}: expected an EC private key")
    return ca_cert, ca_key


def _load_crl_file(path: Path, what: str) -> x509.CertificateRevocationList:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config: {what}: file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"config: {what}: cannot read {path}: {e.strerror or e}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise ConfigError(f"config: {what}: {path} is not a certificate revocation list "
                          f"(DER or PEM): {e}") from None


@dataclass(frozen=True)
class RevocationList:
    """A federation CA's certificate revocation list, checked: the serials it revokes (of
    certificates the CA issued itself), its number (higher = newer) and dates."""

    serials: frozenset[int]
    number: int
    last_update: dt.datetime
    next_update: dt.datetime | None


def _check_crl(crl: x509.CertificateRevocationList, ca: x509.Certificate, path: Path,
               what: str) -> RevocationList:
    """Signed by ``ca``, a complete list (not a delta), no critical extension this code does
    not know, not issued in the future."""
    try:
        signed = crl.issuer == ca.subject and crl.is_signature_valid(
            ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        signed = False
    if not signed:
        raise ConfigError(f"config: {what}: {path} is not signed by federation.federation_ca")
    number = 0
    for ext in crl.extensions:
        if isinstance(ext.value, x509.DeltaCRLIndicator):
            raise ConfigError(f"config: {what}: {path} is a delta list; a complete one is "
                              "needed (qpc-federation-certs crl)")
        if isinstance(ext.value, x509.CRLNumber):
            number = ext.value.crl_number
        elif ext.critical:
            raise ConfigError(f"config: {what}: {path} has a critical extension qpc does not "
                              f"know ({ext.oid.dotted_string})")
    now = dt.datetime.now(dt.UTC)
    if crl.last_update_utc > now + dt.timedelta(minutes=10):
        raise ConfigError(f"config: {what}: {path} was issued in the future "
                          f"({crl.last_update_utc:%Y-%m-%d %H:%M} UTC): check the clocks")
    return RevocationList(frozenset(r.serial_number for r in crl), number,
                          crl.last_update_utc, crl.next_update_utc)


def _lock(ca_dir: Path) -> int:
    """An exclusive lock on the CA's revocation list, for one read-change-write."""
    fd = os.open(ca_dir / ".federation-crl.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def write_crl(ca_dir: Path, *, add: int | None = None, days: int = CRL_DAYS) -> Path:
    """Write the CA's revocation list ``ca_dir/federation-crl.der`` again: the serials it
    holds (none on first use) plus ``add``, under the next list number, current for
    ``days``.  Runs one at a time (a lock beside the list)."""
    ca_cert, ca_key = _ca_signer(ca_dir)
    path = ca_dir / CRL
    fd = _lock(ca_dir)
    try:
        listed: dict[int, dt.datetime] = {}
        number = 0
        if path.exists():
            old = _load_crl_file(path, "crl")
            try:
                current = _check_crl(old, ca_cert, path, "crl")
            except ConfigError as e:
                raise ConfigError(f"{path} was not issued by the CA in {ca_dir}, or is not a "
                                  f"list this tool writes ({e}); not changed") from None
            listed = {r.serial_number: r.revocation_date_utc for r in old}
            number = current.number
        now = dt.datetime.now(dt.UTC)
        if add is not None:
            listed.setdefault(add, now)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
            .add_extension(x509.CRLNumber(number + 1), critical=False)
        )
        for serial, when in sorted(listed.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
                .build())
        crl = builder.sign(ca_key, hashes.SHA256())
        write_atomic(path, crl.public_bytes(serialization.Encoding.DER), 0o644)
    finally:
        os.close(fd)  # releases the lock
    return path


def revoke(ca_dir: Path, *, serial: int, days: int = CRL_DAYS) -> Path:
    """Add ``serial`` (a certificate the CA issued) to the CA's revocation list."""
    if not 1 <= serial < 2**159:
        raise ConfigError("revoke: a serial number is between 1 and 2^159 - 1")
    ca_cert, _key = _ca_signer(ca_dir)
    if serial == ca_cert.serial_number:
        raise ConfigError("revoke: that is the serial of the federation CA itself; a "
                          "compromised CA is replaced (a new CA, every node issued again), "
                          "not revoked")
    return write_crl(ca_dir, add=serial, days=days)


def revoke_certificate(ca_dir: Path, cert_path: Path, *, days: int = CRL_DAYS) -> int:
    """Revoke the node certificate in ``cert_path``; it must be one the CA issued (the CA's
    own certificate cannot be revoked this way).  Returns its serial."""
    ca_cert, _key = _ca_signer(ca_dir)
    cert = load_certificate(cert_path, "revoke --cert")
    if cert == ca_cert:
        raise ConfigError("revoke: that is the federation CA itself; a compromised CA is "
                          "replaced (a new CA, every node issued again), not revoked")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"revoke: {cert_path} was not issued by the CA in {ca_dir}: "
                          "revoking it would change nothing") from None
    revoke(ca_dir, serial=cert.serial_number, days=days)
    return cert.serial_number


def parse_serial(text: str) -> int:
    """A serial number as ``openssl x509 -serial`` or the log print it: hex, optionally with
    ``0x`` and colons."""
    t = text.strip()
    if t[:2] in ("0x", "0X"):
        t = t[2:]
    t = t.replace(":", "")
    if not t or any(ch not in string.hexdigits for ch in t):
        raise ConfigError(f"revoke: --serial {text!r} is not a hexadecimal serial number")
    return int(t, 16)


def check_not_older(new: RevocationList | None, current: RevocationList | None) -> None:
    """ConfigError when ``new`` (of the same CA) is older than ``current``: its number
    decides (dates only between equal numbers: lists written on another machine may carry a
    slightly slower clock)."""
    if current is None or new is None:
        return
    if new.number < current.number or (
            new.number == current.number and new.last_update < current.last_update):
        raise ConfigError(
            f"config: federation.federation_crl: list number {new.number} is older than the "
            f"one in use ({current.number}): refused (it could re-admit revoked "
            "certificates)")


def load_crl(path: Path, ca: x509.Certificate) -> RevocationList:
    """The revocation list in ``path``, checked (signed by the federation CA ``ca``, ...)."""
    what = "federation.federation_crl"
    crl = _check_crl(_load_crl_file(path, what), ca, path, what)
    if crl.next_update is not None and crl.next_update < dt.datetime.now(dt.UTC):
        log.warning("%s: %s was due to be replaced on %s: still used (its revocations stand); "
                    "write a current one with qpc-federation-certs crl", what, path,
                    crl.next_update)
    return crl


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Signed by ``ca``'s key (not just naming it: two CAs may share a name)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class Revoked(ValueError):
    """A certificate the federation's revocation list names."""


@dataclass(frozen=True)
class FederationTls:
    """This node's federation certificate and key, the federation CA, and its revocation
    list (``federation_crl``; None without one)."""

    material: TlsMaterial
    ca: x509.Certificate
    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes
    crl: RevocationList | None = None

    def check_revoked(self, chain: Sequence[x509.Certificate]) -> None:
        """Revoked when the list names a certificate of ``chain`` that the CA issued (the
        list is the CA's: it speaks of the CA's own serials only)."""
        if self.crl is None:
            return
        for cert in chain:
            if cert == self.ca:  # the root of the chain is not the list's to revoke
                continue
            if cert.serial_number in self.crl.serials and _issued_by(cert, self.ca):
                raise Revoked(f"certificate serial {cert.serial_number:x} is revoked "
                              "(federation.federation_crl)")

    def verify_peer(self, chain: list[x509.Certificate]) -> set[str]:
        """Check a peer's client certificate chain against the federation CA; return the DNS
        names it holds (its domains).  Raises ``VerificationError`` when it does not chain
        to the CA, is expired, or is not for client authentication, and :class:`Revoked`
        when the revocation list names it (or a CA-issued certificate of its chain)."""
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store([self.ca]))
            .time(dt.datetime.now(dt.UTC))
            .build_client_verifier()
        )
        verified = verifier.verify(chain[0], chain[1:])
        self.check_revoked(verified.chain)
        return {n.value.lower() for n in verified.subjects or () if isinstance(n, x509.DNSName)}


def load(cfg: FederationConfig, *, own_revoked_fatal: bool = True) -> FederationTls:
    """Load and check ``federation_cert`` / ``federation_key`` / ``federation_ca`` (DER or
    PEM) and ``federation_crl``: the key must belong to the certificate, and the certificate
    must be valid under the CA for this node's ``domain`` (else peers would refuse it) and,
    with ``own_revoked_fatal``, not revoked (a reload applies the list all the same: peers
    refuse this node anyway, and the node must still refuse the others it names)."""
    assert cfg.federation_cert and cfg.federation_key and cfg.federation_ca
    chain = load_certificate_chain(cfg.federation_cert, "federation.federation_cert")
    key = load_private_key(cfg.federation_key, "federation.federation_key")
    check_key_matches(chain, key, cfg.federation_cert, cfg.federation_key,
                      ("federation.federation_cert", "federation.federation_key"))
    ca = load_certificate(cfg.federation_ca, "federation.federation_ca")
    crl = load_crl(cfg.federation_crl, ca) if cfg.federation_crl else None
    pem = serialization.Encoding.PEM
    tls = FederationTls(
        material=TlsMaterial(chain[0], key, cfg.federation_cert, tuple(chain[1:])),
        ca=ca,
        ca_pem=ca.public_bytes(pem),
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        cert_pem=b"".join(c.public_bytes(pem) for c in chain),
        crl=crl,
    )
    try:
        names = replace(tls, crl=None).verify_peer(chain)
        if cfg.domain not in names:
            raise ConfigError(
                f"config: federation.domain: {cfg.domain!r} is not among the names of "
                f"{cfg.federation_cert} ({', '.join(sorted(names)) or 'none'}): peers would "
                "refuse this node"
            )
        tls.check_revoked(chain)
    except Revoked:
        msg = (f"config: federation.federation_cert: {cfg.federation_cert} is revoked by "
               f"federation.federation_crl ({cfg.federation_crl}): issue this node a new one")
        if own_revoked_fatal:
            raise ConfigError(msg) from None
        log.critical("%s (peers refuse it; the list still applies to them)", msg)
        return tls
    except verification.VerificationError as e:
        raise ConfigError(
            f"config: federation.federation_cert: {cfg.federation_cert} is not a valid "
            f"client certificate under federation.federation_ca ({cfg.federation_ca}): {e}"
        ) from None
    return tls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qpc-federation-certs", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ca = sub.add_parser("ca", help="create the federation CA (once per federation)")
    ca.add_argument("--out", type=Path, required=True)
    ca.add_argument("--days", type=int, default=3650)
    iss = sub.add_parser("issue", help="issue a node certificate under the CA")
    iss.add_argument("--ca-dir", type=Path, required=True)
    iss.add_argument("--domain", required=True, help="the node's federation.domain")
    iss.add_argument("--ip", action="append", default=[], help="also valid for this address")
    iss.add_argument("--out", type=Path, required=True)
    iss.add_argument("--days", type=int, default=825)
    crl = sub.add_parser("crl", help="write the CA's revocation list again (current for "
                         "--days; the first time: one naming no certificate)")
    crl.add_argument("--ca-dir", type=Path, required=True)
    crl.add_argument("--days", type=int, default=CRL_DAYS)
    rev = sub.add_parser("revoke", help="add a node certificate to the CA's revocation list")
    rev.add_argument("--ca-dir", type=Path, required=True)
    which = rev.add_mutually_exclusive_group(required=True)
    which.add_argument("--cert", type=Path, help="the node certificate to revoke")
    which.add_argument("--serial", help="its serial number (hex)")
    rev.add_argument("--days", type=int, default=CRL_DAYS,
                     help="how long the list is current (its nextUpdate)")
    a = p.parse_args(argv)
    if not 1 <= a.days <= 36500:
        print("qpc-federation-certs: --days must be between 1 and 36500", file=sys.stderr)
        return 2
    try:
        if a.cmd == "ca":
            path = make_ca(a.out, days=a.days)
            print(f"wrote {path} and {a.out / CA_KEY} (keep the key offline)")
        elif a.cmd == "crl":
            path = write_crl(a.ca_dir, days=a.days)
            print(f"wrote {path}; copy it to every node (federation_crl) and send them SIGHUP")
        elif a.cmd == "revoke":
            if a.cert is not None:
                serial = revoke_certificate(a.ca_dir, a.cert, days=a.days)
            else:
                serial = parse_serial(a.serial)
                path = revoke(a.ca_dir, serial=serial, days=a.days)
            print(f"revoked serial {serial:x}: wrote {a.ca_dir / CRL}; copy it to every node "
                  "(federation_crl) and send them SIGHUP")
        else:
            path = issue(a.ca_dir, a.out, a.domain, ips=tuple(a.ip), days=a.days)
            print(f"wrote {path}, {a.out / NODE_KEY} and {a.out / CA_CERT}")
    except ConfigError as e:
        print(f"qpc-federation-certs: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
