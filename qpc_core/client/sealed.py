"""Interim text sealing for ``qpc-client send/recv`` (until MLS groups land).

A libsodium sealed box (X25519 + XSalsa20-Poly1305, anonymous sender) to the recipient's
identity key converted from Ed25519 to X25519.  Inside the box the sender puts its Ed25519
identity key and a signature over (recipient key || text), so the recipient can tell who
wrote it.  The server stores only the box.  See docs/protocol.md for what this does not
protect (no forward secrecy, no group state, no replay protection across sessions).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from nacl import bindings
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from qpc_core.identity import public_bytes, verify_signature

MAGIC = b"qpc-text-v1\x00"
SIGN_CONTEXT = b"qpc-v1 text\x00"


def _x25519_public(ed_pub: bytes) -> PublicKey:
    return PublicKey(bindings.crypto_sign_ed25519_pk_to_curve25519(ed_pub))


def _x25519_private(key: Ed25519PrivateKey) -> PrivateKey:
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    sk64 = seed + public_bytes(key)
    return PrivateKey(bindings.crypto_sign_ed25519_sk_to_curve25519(sk64))


def seal_text(sender: Ed25519PrivateKey, recipient_key: bytes, text: str) -> bytes:
    body = text.encode()
    sig = sender.sign(SIGN_CONTEXT + recipient_key + body)
    plain = MAGIC + public_bytes(sender) + sig + body
    try:
        box = SealedBox(_x25519_public(recipient_key))
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"recipient key is not a valid Ed25519 key: {e}") from None
    return bytes(box.encrypt(plain))


def open_text(me: Ed25519PrivateKey, data: bytes) -> tuple[bytes, str]:
    """Return (sender identity key, text); ValueError when it is not for us or forged."""
    try:
        plain = SealedBox(_x25519_private(me)).decrypt(data)
    except CryptoError:
        raise ValueError("cannot open: not sealed to this identity") from None
    if not plain.startswith(MAGIC) or len(plain) < len(MAGIC) + 96:
        raise ValueError("not a qpc text message")
    rest = plain[len(MAGIC) :]
    sender, sig, body = rest[:32], rest[32:96], rest[96:]
    if not verify_signature(sender, sig, SIGN_CONTEXT + public_bytes(me) + body):
        raise ValueError("sender signature does not verify")
    return sender, body.decode(errors="replace")
