"""Ed25519 helpers: identity-proof messages, signature checks, the server signing key."""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qpc_core.errors import BadRequest

IDENTITY_KEY_LEN = 32
PROVE_IDENTITY_CONTEXT = b"qpc-v1 prove-identity\x00"


def check_identity_key(key: bytes, field: str = "identity_key") -> bytes:
    if len(key) != IDENTITY_KEY_LEN:
        raise BadRequest(f"{field} must be exactly 32 bytes (Ed25519 public key), got {len(key)}")
    return key


def prove_identity_message(nonce: bytes, identity_key: bytes, server_cert: bytes = b"") -> bytes:
    """The bytes a client signs to prove it holds ``identity_key`` on this connection.

    ``server_cert`` is :func:`certificate_binding` of the server's TLS certificate (the one
    the client verified in this connection's handshake): a proof made for one server cannot
    be relayed to another by a server that passes its challenge along."""
    return PROVE_IDENTITY_CONTEXT + nonce + identity_key + server_cert


def certificate_binding(certificate_der: bytes) -> bytes:
    """SHA-256 of a DER certificate: what identity proofs are bound to."""
    return hashlib.sha256(certificate_der).digest()


def verify_signature(identity_key: bytes, signature: bytes, message: bytes) -> bool:
    if len(identity_key) != IDENTITY_KEY_LEN or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(identity_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
