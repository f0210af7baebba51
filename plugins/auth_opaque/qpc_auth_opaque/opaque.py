"""OPAQUE-3DH (RFC 9807) with the ristretto255-SHA512 configuration, sans-I/O.

This module implements the OPAQUE augmented PAKE exactly as specified in
RFC 9807, instantiated with:

* OPRF: ristretto255-SHA512, RFC 9497 mode 0x00 (base OPRF)
* KDF: HKDF-SHA512, MAC: HMAC-SHA512, Hash: SHA-512
* AKE: 3DH over ristretto255
* KSF: pluggable (:class:`IdentityKSF` for test vectors,
  :class:`Argon2idKSF` by default in production)

Sizes: ``Nh = Nm = Nx = 64``, ``Npk = Nsk = Noe = Nok = 32``, ``Nn = Nseed = 32``.

The module does no I/O at all: every function takes parsed messages and
returns messages plus the state the caller must keep for the next step.
All randomness comes from :func:`os.urandom` / libsodium unless explicitly
injected (the injection parameters exist only so that the RFC test vectors can
be reproduced; never pass them in production).

Wire encodings are the fixed-size concatenations from RFC 9807 section 4/5/6:

=====================  =====  ==============================================
message                bytes  layout
=====================  =====  ==============================================
RegistrationRequest     32    blinded_message
RegistrationResponse    64    evaluated_message | server_public_key
RegistrationRecord     192    client_public_key | masking_key | envelope
KE1                     96    blinded_message | client_nonce | client_keyshare
KE2                    320    evaluated_message | masking_nonce |
                              masked_response | server_nonce |
                              server_keyshare | server_mac
KE3                     64    client_mac
=====================  =====  ==============================================

Note: Python cannot reliably zeroize memory, so secrets held in the state
objects live until garbage-collected.
"""

from __future__ import annotations

import hashlib
import hmac as _stdlib_hmac
import os
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import rbcl  # type: ignore[import-untyped, unused-ignore]
from argon2.low_level import Type as _Argon2Type
from argon2.low_level import hash_secret_raw
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_KSF",
    "KE1",
    "KE2",
    "KE3",
    "KSF",
    "NH",
    "NM",
    "NN",
    "NOE",
    "NOK",
    "NPK",
    "NSEED",
    "NSK",
    "NX",
    "Argon2idKSF",
    "AuthRequest",
    "AuthResponse",
    "ClientAuthenticationError",
    "ClientLoginState",
    "ClientRegState",
    "CredentialRequest",
    "CredentialResponse",
    "Envelope",
    "EnvelopeRecoveryError",
    "IdentityKSF",
    "OpaqueError",
    "RegistrationRecord",
    "RegistrationRequest",
    "RegistrationResponse",
    "ServerAuthenticationError",
    "ServerLoginState",
    "ServerSetup",
    "client_finalize_registration",
    "client_finish_login",
    "client_start_login",
    "client_start_registration",
    "create_fake_record",
    "derive_diffie_hellman_key_pair",
    "server_create_registration_response",
    "server_finish",
    "server_generate_ke2",
]

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

NH = 64  # hash output length (SHA-512)
NM = 64  # MAC output length (HMAC-SHA512)
NX = 64  # KDF PRK length (HKDF-SHA512)
NPK = 32  # public key length (ristretto255 element)
NSK = 32  # private key length (ristretto255 scalar)
NOE = 32  # OPRF element length
NOK = 32  # OPRF private key length
NN = 32  # nonce length
NSEED = 32  # private key seed length

ENVELOPE_LEN = NN + NM
MASKED_RESPONSE_LEN = NPK + NN + NM

DEFAULT_CONTEXT = b"qpc-opaque-v1"

# Order of the ristretto255 prime-order group.
_GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493
_IDENTITY = bytes(32)
_MAX_U8 = 0xFF
_MAX_U16 = 0xFFFF
_ARGON2_MIN_SALT = 8

# RFC 9497: contextString = "OPRFV1-" || I2OSP(mode, 1) || "-" || identifier
_OPRF_CONTEXT = b"OPRFV1-" + b"\x00" + b"-" + b"ristretto255-SHA512"
_DST_HASH_TO_GROUP = b"HashToGroup-" + _OPRF_CONTEXT
_DST_DERIVE_KEY_PAIR = b"DeriveKeyPair" + _OPRF_CONTEXT

_INFO_OPRF_KEY = b"OPAQUE-DeriveKeyPair"
_INFO_DH_KEY = b"OPAQUE-DeriveDiffieHellmanKeyPair"


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class OpaqueError(ValueError):
    """Any OPAQUE protocol failure: malformed input, invalid point, bad MAC."""


class EnvelopeRecoveryError(OpaqueError):
    """The client could not open its envelope (wrong password or fake record)."""


class ServerAuthenticationError(OpaqueError):
    """The client rejected the server MAC in KE2."""


class ClientAuthenticationError(OpaqueError):
    """The server rejected the client MAC in KE3."""


# ---------------------------------------------------------------------------
# Low level helpers
# ---------------------------------------------------------------------------


def _i2osp(value: int, length: int) -> bytes:
    if value < 0 or value >= 1 << (8 * length):
        raise OpaqueError(f"value {value} does not fit in {length} byte(s)")
    return value.to_bytes(length, "big")


def _len_prefixed(data: bytes) -> bytes:
    return _i2osp(len(data), 2) + data


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise OpaqueError("xor operands differ in length")
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _require_len(name: str, data: bytes, expected: int) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise OpaqueError(f"{name} must be bytes, got {type(data).__name__}")
    if len(data) != expected:
        raise OpaqueError(f"{name} must be {expected} bytes, got {len(data)}")


def _hash(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()


def _mac(key: bytes, msg: bytes) -> bytes:
    h = _crypto_hmac.HMAC(key, hashes.SHA512())
    h.update(msg)
    return h.finalize()


def _extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869) with SHA-512."""
    return _mac(salt, ikm)


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand (RFC 5869) with SHA-512."""
    return HKDFExpand(algorithm=hashes.SHA512(), length=length, info=info).derive(prk)


def _expand_label(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """RFC 9807 section 6.4.1 Expand-Label."""
    full_label = b"OPAQUE-" + label
    custom_label = (
        _i2osp(length, 2)
        + _i2osp(len(full_label), 1)
        + full_label
        + _i2osp(len(context), 1)
        + context
    )
    return _expand(secret, custom_label, length)


def _derive_secret(secret: bytes, label: bytes, transcript_hash: bytes) -> bytes:
    return _expand_label(secret, label, transcript_hash, NX)


def _expand_message_xmd(msg: bytes, dst: bytes, len_in_bytes: int) -> bytes:
    """RFC 9380 section 5.3.1 expand_message_xmd with SHA-512."""
    b_in_bytes = 64
    s_in_bytes = 128
    if len(dst) > _MAX_U8:
        raise OpaqueError("DST too long")
    ell = -(-len_in_bytes // b_in_bytes)
    if ell > _MAX_U8 or len_in_bytes > _MAX_U16:
        raise OpaqueError("requested too many bytes from expand_message_xmd")
    dst_prime = dst + _i2osp(len(dst), 1)
    z_pad = bytes(s_in_bytes)
    l_i_b_str = _i2osp(len_in_bytes, 2)
    b0 = _hash(z_pad + msg + l_i_b_str + b"\x00" + dst_prime)
    b_i = _hash(b0 + b"\x01" + dst_prime)
    out = bytearray(b_i)
    for i in range(2, ell + 1):
        b_i = _hash(_xor(b0, b_i) + _i2osp(i, 1) + dst_prime)
        out += b_i
    return bytes(out[:len_in_bytes])


# --- group operations (ristretto255 via libsodium) -------------------------


def _scalar_is_valid(scalar: bytes) -> bool:
    value = int.from_bytes(scalar, "little")
    return 0 < value < _GROUP_ORDER


def _check_scalar(name: str, scalar: bytes) -> bytes:
    _require_len(name, scalar, NSK)
    scalar = bytes(scalar)
    if not _scalar_is_valid(scalar):
        raise OpaqueError(f"{name} is not a canonical non-zero ristretto255 scalar")
    return scalar


def _check_element(name: str, element: bytes) -> bytes:
    """DeserializeElement: canonical encoding of a non-identity element."""
    _require_len(name, element, NPK)
    element = bytes(element)
    if element == _IDENTITY or not rbcl.crypto_core_ristretto255_is_valid_point(element):
        raise OpaqueError(f"{name} is not a valid ristretto255 element")
    return element


def _scalar_mult(scalar: bytes, element: bytes) -> bytes:
    try:
        return bytes(rbcl.crypto_scalarmult_ristretto255(scalar, element))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise OpaqueError("scalar multiplication failed (invalid input)") from exc


def _scalar_mult_base(scalar: bytes) -> bytes:
    try:
        return bytes(rbcl.crypto_scalarmult_ristretto255_base(scalar))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise OpaqueError("scalar multiplication failed (invalid scalar)") from exc


def _random_scalar() -> bytes:
    while True:
        scalar = bytes(rbcl.crypto_core_ristretto255_scalar_random())
        if _scalar_is_valid(scalar):
            return scalar


def _hash_to_group(msg: bytes) -> bytes:
    uniform = _expand_message_xmd(msg, _DST_HASH_TO_GROUP, 64)
    return bytes(rbcl.crypto_core_ristretto255_from_hash(uniform))


def _hash_to_scalar(msg: bytes, dst: bytes) -> bytes:
    uniform = _expand_message_xmd(msg, dst, 64)
    return bytes(rbcl.crypto_core_ristretto255_scalar_reduce(uniform))


# --- OPRF (RFC 9497, mode 0x00) ---------------------------------------------


def _oprf_derive_key_pair(seed: bytes, info: bytes) -> tuple[bytes, bytes]:
    """RFC 9497 section 3.2.1 DeriveKeyPair."""
    derive_input = seed + _len_prefixed(info)
    for counter in range(256):
        sk = _hash_to_scalar(derive_input + _i2osp(counter, 1), _DST_DERIVE_KEY_PAIR)
        if _scalar_is_valid(sk):
            return sk, _scalar_mult_base(sk)
    raise OpaqueError("DeriveKeyPair failed")  # pragma: no cover - probability ~2^-8000


def derive_diffie_hellman_key_pair(seed: bytes) -> tuple[bytes, bytes]:
    """RFC 9807 DeriveDiffieHellmanKeyPair: ``seed`` (Nseed bytes) -> (sk, pk)."""
    _require_len("seed", seed, NSEED)
    return _oprf_derive_key_pair(bytes(seed), _INFO_DH_KEY)


def _oprf_blind(password: bytes, blind: bytes | None) -> tuple[bytes, bytes]:
    if blind is None:
        blind = _random_scalar()
    blind = _check_scalar("blind", blind)
    input_element = _hash_to_group(password)
    if input_element == _IDENTITY:  # pragma: no cover - negligible probability
        raise OpaqueError("password maps to the identity element")
    return blind, _scalar_mult(blind, input_element)


def _oprf_finalize(password: bytes, blind: bytes, evaluated_element: bytes) -> bytes:
    inverse = bytes(rbcl.crypto_core_ristretto255_scalar_invert(blind))
    unblinded = _scalar_mult(inverse, evaluated_element)
    return _hash(_len_prefixed(password) + _len_prefixed(unblinded) + b"Finalize")


def _derive_oprf_key(oprf_seed: bytes, credential_identifier: bytes) -> bytes:
    seed = _expand(oprf_seed, credential_identifier + b"OprfKey", NOK)
    oprf_key, _ = _oprf_derive_key_pair(seed, _INFO_OPRF_KEY)
    return oprf_key


# ---------------------------------------------------------------------------
# Key stretching functions
# ---------------------------------------------------------------------------


@runtime_checkable
class KSF(Protocol):
    """A key stretching function ``Stretch(msg) -> Nh bytes``."""

    def stretch(self, msg: bytes) -> bytes: ...


@dataclass(frozen=True)
class IdentityKSF:
    """``Stretch(msg) = msg``. Only for test vectors; offers no hardening."""

    def stretch(self, msg: bytes) -> bytes:
        return bytes(msg)


@dataclass(frozen=True)
class Argon2idKSF:
    """Argon2id key stretching with output length ``Nh`` (64 bytes).

    RFC 9807 defines the KSF as ``Stretch(msg)`` with no salt input: the OPRF
    output is already unique per (server, credential, password), so salting
    adds nothing. Argon2 nevertheless requires a salt, so -- like other
    OPAQUE implementations -- we use a fixed all-zero 16-byte salt.

    Defaults (19 MiB, t=2, p=1) follow the OWASP minimum recommendation.
    Client and server configuration MUST agree on these parameters, since they
    change the randomized password and therefore the registration record.
    """

    memory_kib: int = 19456
    iterations: int = 2
    parallelism: int = 1
    salt: bytes = field(default=bytes(16), repr=False)

    def __post_init__(self) -> None:
        if self.memory_kib < 8 * self.parallelism:
            raise OpaqueError("argon2 memory_kib must be >= 8 * parallelism")
        if self.iterations < 1 or self.parallelism < 1:
            raise OpaqueError("argon2 iterations and parallelism must be >= 1")
        if len(self.salt) < _ARGON2_MIN_SALT:
            raise OpaqueError("argon2 salt must be at least 8 bytes")

    def stretch(self, msg: bytes) -> bytes:
        return hash_secret_raw(
            secret=bytes(msg),
            salt=self.salt,
            time_cost=self.iterations,
            memory_cost=self.memory_kib,
            parallelism=self.parallelism,
            hash_len=NH,
            type=_Argon2Type.ID,
        )


#: Production default KSF (both client and server configuration must agree).
DEFAULT_KSF: KSF = Argon2idKSF()


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


def _split(data: bytes, name: str, sizes: tuple[int, ...]) -> list[bytes]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise OpaqueError(f"{name} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    total = sum(sizes)
    if len(data) != total:
        raise OpaqueError(f"{name} must be {total} bytes, got {len(data)}")
    out: list[bytes] = []
    pos = 0
    for size in sizes:
        out.append(data[pos : pos + size])
        pos += size
    return out


@dataclass(frozen=True)
class Envelope:
    nonce: bytes
    auth_tag: bytes

    SIZE = ENVELOPE_LEN

    def __post_init__(self) -> None:
        _require_len("envelope nonce", self.nonce, NN)
        _require_len("envelope auth_tag", self.auth_tag, NM)

    def serialize(self) -> bytes:
        return self.nonce + self.auth_tag

    @classmethod
    def deserialize(cls, data: bytes) -> Envelope:
        nonce, tag = _split(data, "Envelope", (NN, NM))
        return cls(nonce, tag)


@dataclass(frozen=True)
class RegistrationRequest:
    blinded_message: bytes

    SIZE = NOE

    def __post_init__(self) -> None:
        _check_element("RegistrationRequest.blinded_message", self.blinded_message)

    def serialize(self) -> bytes:
        return self.blinded_message

    @classmethod
    def deserialize(cls, data: bytes) -> RegistrationRequest:
        (blinded,) = _split(data, "RegistrationRequest", (NOE,))
        return cls(blinded)


@dataclass(frozen=True)
class RegistrationResponse:
    evaluated_message: bytes
    server_public_key: bytes

    SIZE = NOE + NPK

    def __post_init__(self) -> None:
        _check_element("RegistrationResponse.evaluated_message", self.evaluated_message)
        _check_element("RegistrationResponse.server_public_key", self.server_public_key)

    def serialize(self) -> bytes:
        return self.evaluated_message + self.server_public_key

    @classmethod
    def deserialize(cls, data: bytes) -> RegistrationResponse:
        evaluated, pk = _split(data, "RegistrationResponse", (NOE, NPK))
        return cls(evaluated, pk)


@dataclass(frozen=True)
class RegistrationRecord:
    """What the server stores per credential (RFC 9807 ``RegistrationRecord``)."""

    client_public_key: bytes
    masking_key: bytes
    envelope: Envelope

    SIZE = NPK + NH + ENVELOPE_LEN

    def __post_init__(self) -> None:
        _check_element("RegistrationRecord.client_public_key", self.client_public_key)
        _require_len("RegistrationRecord.masking_key", self.masking_key, NH)
        if not isinstance(self.envelope, Envelope):
            raise OpaqueError("RegistrationRecord.envelope must be an Envelope")

    def serialize(self) -> bytes:
        return self.client_public_key + self.masking_key + self.envelope.serialize()

    @classmethod
    def deserialize(cls, data: bytes) -> RegistrationRecord:
        pk, masking_key, env = _split(data, "RegistrationRecord", (NPK, NH, ENVELOPE_LEN))
        return cls(pk, masking_key, Envelope.deserialize(env))


@dataclass(frozen=True)
class CredentialRequest:
    blinded_message: bytes

    SIZE = NOE

    def __post_init__(self) -> None:
        _check_element("CredentialRequest.blinded_message", self.blinded_message)

    def serialize(self) -> bytes:
        return self.blinded_message

    @classmethod
    def deserialize(cls, data: bytes) -> CredentialRequest:
        (blinded,) = _split(data, "CredentialRequest", (NOE,))
        return cls(blinded)


@dataclass(frozen=True)
class AuthRequest:
    client_nonce: bytes
    client_public_keyshare: bytes

    SIZE = NN + NPK

    def __post_init__(self) -> None:
        _require_len("AuthRequest.client_nonce", self.client_nonce, NN)
        _check_element("AuthRequest.client_public_keyshare", self.client_public_keyshare)

    def serialize(self) -> bytes:
        return self.client_nonce + self.client_public_keyshare

    @classmethod
    def deserialize(cls, data: bytes) -> AuthRequest:
        nonce, keyshare = _split(data, "AuthRequest", (NN, NPK))
        return cls(nonce, keyshare)


@dataclass(frozen=True)
class KE1:
    credential_request: CredentialRequest
    auth_request: AuthRequest

    SIZE = CredentialRequest.SIZE + AuthRequest.SIZE

    def serialize(self) -> bytes:
        return self.credential_request.serialize() + self.auth_request.serialize()

    @classmethod
    def deserialize(cls, data: bytes) -> KE1:
        cred, auth = _split(data, "KE1", (CredentialRequest.SIZE, AuthRequest.SIZE))
        return cls(CredentialRequest.deserialize(cred), AuthRequest.deserialize(auth))


@dataclass(frozen=True)
class CredentialResponse:
    evaluated_message: bytes
    masking_nonce: bytes
    masked_response: bytes

    SIZE = NOE + NN + MASKED_RESPONSE_LEN

    def __post_init__(self) -> None:
        _check_element("CredentialResponse.evaluated_message", self.evaluated_message)
        _require_len("CredentialResponse.masking_nonce", self.masking_nonce, NN)
        _require_len(
            "CredentialResponse.masked_response", self.masked_response, MASKED_RESPONSE_LEN
        )

    def serialize(self) -> bytes:
        return self.evaluated_message + self.masking_nonce + self.masked_response

    @classmethod
    def deserialize(cls, data: bytes) -> CredentialResponse:
        ev, nonce, masked = _split(data, "CredentialResponse", (NOE, NN, MASKED_RESPONSE_LEN))
        return cls(ev, nonce, masked)


@dataclass(frozen=True)
class AuthResponse:
    server_nonce: bytes
    server_public_keyshare: bytes
    server_mac: bytes

    SIZE = NN + NPK + NM

    def __post_init__(self) -> None:
        _require_len("AuthResponse.server_nonce", self.server_nonce, NN)
        _check_element("AuthResponse.server_public_keyshare", self.server_public_keyshare)
        _require_len("AuthResponse.server_mac", self.server_mac, NM)

    def serialize(self) -> bytes:
        return self.server_nonce + self.server_public_keyshare + self.server_mac

    @classmethod
    def deserialize(cls, data: bytes) -> AuthResponse:
        nonce, keyshare, mac = _split(data, "AuthResponse", (NN, NPK, NM))
        return cls(nonce, keyshare, mac)


@dataclass(frozen=True)
class KE2:
    credential_response: CredentialResponse
    auth_response: AuthResponse

    SIZE = CredentialResponse.SIZE + AuthResponse.SIZE

    def serialize(self) -> bytes:
        return self.credential_response.serialize() + self.auth_response.serialize()

    @classmethod
    def deserialize(cls, data: bytes) -> KE2:
        cred, auth = _split(data, "KE2", (CredentialResponse.SIZE, AuthResponse.SIZE))
        return cls(CredentialResponse.deserialize(cred), AuthResponse.deserialize(auth))


@dataclass(frozen=True)
class KE3:
    client_mac: bytes

    SIZE = NM

    def __post_init__(self) -> None:
        _require_len("KE3.client_mac", self.client_mac, NM)

    def serialize(self) -> bytes:
        return self.client_mac

    @classmethod
    def deserialize(cls, data: bytes) -> KE3:
        (mac,) = _split(data, "KE3", (NM,))
        return cls(mac)


# ---------------------------------------------------------------------------
# Server setup and states
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSetup:
    """Long-term server secrets: OPRF seed and the server AKE key pair.

    Serialized as ``oprf_seed (64) | server_private_key (32) |
    server_public_key (32)``. Keep it secret and stable: changing the OPRF
    seed or key pair invalidates every stored registration record.
    """

    oprf_seed: bytes
    server_private_key: bytes
    server_public_key: bytes

    SIZE = NH + NSK + NPK

    def __post_init__(self) -> None:
        _require_len("ServerSetup.oprf_seed", self.oprf_seed, NH)
        _check_scalar("ServerSetup.server_private_key", self.server_private_key)
        _check_element("ServerSetup.server_public_key", self.server_public_key)
        if not _stdlib_hmac.compare_digest(
            _scalar_mult_base(self.server_private_key), self.server_public_key
        ):
            raise OpaqueError("ServerSetup.server_public_key does not match the private key")

    def __repr__(self) -> str:  # never leak secrets into logs
        return f"ServerSetup(server_public_key={self.server_public_key.hex()})"

    @classmethod
    def generate(cls) -> ServerSetup:
        """Fresh random setup (RFC 9807 GenerateAuthKeyPair + random oprf_seed)."""
        sk, pk = derive_diffie_hellman_key_pair(os.urandom(NSEED))
        return cls(os.urandom(NH), sk, pk)

    @classmethod
    def from_private_key(cls, oprf_seed: bytes, server_private_key: bytes) -> ServerSetup:
        sk = _check_scalar("server_private_key", server_private_key)
        return cls(bytes(oprf_seed), sk, _scalar_mult_base(sk))

    def serialize(self) -> bytes:
        return self.oprf_seed + self.server_private_key + self.server_public_key

    @classmethod
    def deserialize(cls, data: bytes) -> ServerSetup:
        seed, sk, pk = _split(data, "ServerSetup", (NH, NSK, NPK))
        return cls(seed, sk, pk)


@dataclass(frozen=True)
class ServerLoginState:
    """Server state kept between KE2 and KE3 (serialized: mac | session key)."""

    expected_client_mac: bytes = field(repr=False)
    session_key: bytes = field(repr=False)

    SIZE = NM + NX

    def __post_init__(self) -> None:
        _require_len("ServerLoginState.expected_client_mac", self.expected_client_mac, NM)
        _require_len("ServerLoginState.session_key", self.session_key, NX)

    def serialize(self) -> bytes:
        return self.expected_client_mac + self.session_key

    @classmethod
    def deserialize(cls, data: bytes) -> ServerLoginState:
        mac, key = _split(data, "ServerLoginState", (NM, NX))
        return cls(mac, key)


@dataclass(frozen=True)
class ClientRegState:
    """Client state kept between RegistrationRequest and RegistrationResponse."""

    password: bytes = field(repr=False)
    blind: bytes = field(repr=False)
    request: RegistrationRequest


@dataclass(frozen=True)
class ClientLoginState:
    """Client state kept between KE1 and KE2."""

    password: bytes = field(repr=False)
    blind: bytes = field(repr=False)
    client_secret: bytes = field(repr=False)
    ke1: KE1


# ---------------------------------------------------------------------------
# Shared building blocks
# ---------------------------------------------------------------------------


def _cleartext_credentials(
    server_public_key: bytes,
    client_public_key: bytes,
    server_identity: bytes | None,
    client_identity: bytes | None,
) -> tuple[bytes, bytes, bytes]:
    """Returns (serialized CleartextCredentials, server_identity, client_identity)."""
    sid = server_public_key if server_identity is None else bytes(server_identity)
    cid = client_public_key if client_identity is None else bytes(client_identity)
    if len(sid) > _MAX_U16 or len(cid) > _MAX_U16:
        raise OpaqueError("identities must be shorter than 65536 bytes")
    return server_public_key + _len_prefixed(sid) + _len_prefixed(cid), sid, cid


def _randomized_password(oprf_output: bytes, ksf: KSF) -> bytes:
    stretched = ksf.stretch(oprf_output)
    return _extract(b"", oprf_output + stretched)


@dataclass(frozen=True)
class _EnvelopeKeys:
    auth_key: bytes
    export_key: bytes
    client_private_key: bytes
    client_public_key: bytes


def _envelope_keys(randomized_password: bytes, nonce: bytes) -> _EnvelopeKeys:
    auth_key = _expand(randomized_password, nonce + b"AuthKey", NH)
    export_key = _expand(randomized_password, nonce + b"ExportKey", NH)
    seed = _expand(randomized_password, nonce + b"PrivateKey", NSEED)
    sk, pk = derive_diffie_hellman_key_pair(seed)
    return _EnvelopeKeys(auth_key, export_key, sk, pk)


def _preamble(
    context: bytes,
    client_identity: bytes,
    ke1: KE1,
    server_identity: bytes,
    credential_response: CredentialResponse,
    server_nonce: bytes,
    server_public_keyshare: bytes,
) -> bytes:
    if len(context) > _MAX_U16:
        raise OpaqueError("context must be shorter than 65536 bytes")
    return (
        b"OPAQUEv1-"
        + _len_prefixed(context)
        + _len_prefixed(client_identity)
        + ke1.serialize()
        + _len_prefixed(server_identity)
        + credential_response.serialize()
        + server_nonce
        + server_public_keyshare
    )


@dataclass(frozen=True)
class _AkeKeys:
    handshake_secret: bytes
    session_key: bytes
    server_mac_key: bytes
    client_mac_key: bytes


def _derive_keys(ikm: bytes, preamble: bytes) -> _AkeKeys:
    prk = _extract(b"", ikm)
    preamble_hash = _hash(preamble)
    handshake_secret = _derive_secret(prk, b"HandshakeSecret", preamble_hash)
    session_key = _derive_secret(prk, b"SessionKey", preamble_hash)
    km2 = _derive_secret(handshake_secret, b"ServerMAC", b"")
    km3 = _derive_secret(handshake_secret, b"ClientMAC", b"")
    return _AkeKeys(handshake_secret, session_key, km2, km3)


def _random_or(name: str, value: bytes | None, length: int) -> bytes:
    if value is None:
        return os.urandom(length)
    _require_len(name, value, length)
    return bytes(value)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def client_start_registration(
    password: bytes, blind: bytes | None = None
) -> tuple[ClientRegState, RegistrationRequest]:
    """RFC 9807 CreateRegistrationRequest. ``blind`` is for test vectors only."""
    password = bytes(password)
    blind, blinded = _oprf_blind(password, blind)
    request = RegistrationRequest(blinded)
    return ClientRegState(password, blind, request), request


def server_create_registration_response(
    setup: ServerSetup, request: RegistrationRequest, credential_identifier: bytes
) -> RegistrationResponse:
    """RFC 9807 CreateRegistrationResponse."""
    oprf_key = _derive_oprf_key(setup.oprf_seed, bytes(credential_identifier))
    blinded = _check_element("blinded_message", request.blinded_message)
    evaluated = _scalar_mult(oprf_key, blinded)
    return RegistrationResponse(evaluated, setup.server_public_key)


def client_finalize_registration(
    state: ClientRegState,
    response: RegistrationResponse,
    ksf: KSF,
    server_identity: bytes | None = None,
    client_identity: bytes | None = None,
    envelope_nonce: bytes | None = None,
) -> tuple[RegistrationRecord, bytes]:
    """RFC 9807 FinalizeRegistrationRequest -> (record to upload, export_key).

    ``envelope_nonce`` is for test vectors only.
    """
    evaluated = _check_element("evaluated_message", response.evaluated_message)
    server_public_key = _check_element("server_public_key", response.server_public_key)
    oprf_output = _oprf_finalize(state.password, state.blind, evaluated)
    randomized_password = _randomized_password(oprf_output, ksf)

    nonce = _random_or("envelope_nonce", envelope_nonce, NN)
    masking_key = _expand(randomized_password, b"MaskingKey", NH)
    keys = _envelope_keys(randomized_password, nonce)
    cleartext, _, _ = _cleartext_credentials(
        server_public_key, keys.client_public_key, server_identity, client_identity
    )
    auth_tag = _mac(keys.auth_key, nonce + cleartext)
    record = RegistrationRecord(keys.client_public_key, masking_key, Envelope(nonce, auth_tag))
    return record, keys.export_key


# ---------------------------------------------------------------------------
# Login
# ---------------------------------------------------------------------------


def client_start_login(
    password: bytes,
    blind: bytes | None = None,
    client_nonce: bytes | None = None,
    client_keyshare_seed: bytes | None = None,
) -> tuple[ClientLoginState, KE1]:
    """RFC 9807 GenerateKE1. The optional arguments are for test vectors only."""
    password = bytes(password)
    blind, blinded = _oprf_blind(password, blind)
    nonce = _random_or("client_nonce", client_nonce, NN)
    seed = _random_or("client_keyshare_seed", client_keyshare_seed, NSEED)
    client_secret, client_keyshare = derive_diffie_hellman_key_pair(seed)
    ke1 = KE1(CredentialRequest(blinded), AuthRequest(nonce, client_keyshare))
    return ClientLoginState(password, blind, client_secret, ke1), ke1


def create_fake_record(
    client_private_key: bytes | None = None, masking_key: bytes | None = None
) -> RegistrationRecord:
    """Fake record for unknown credentials (RFC 9807 section 10.9).

    ``client_public_key`` is a random public key, ``masking_key`` random
    ``Nh`` bytes and the envelope all zeros. The arguments are for test
    vectors only.
    """
    if client_private_key is None:
        sk = _random_scalar()
    else:
        sk = _check_scalar("fake client_private_key", client_private_key)
    masking = _random_or("fake masking_key", masking_key, NH)
    return RegistrationRecord(_scalar_mult_base(sk), masking, Envelope(bytes(NN), bytes(NM)))


def server_generate_ke2(
    setup: ServerSetup,
    record: RegistrationRecord | None,
    credential_identifier: bytes,
    ke1: KE1,
    client_identity: bytes | None = None,
    context: bytes = DEFAULT_CONTEXT,
    server_identity: bytes | None = None,
    *,
    masking_nonce: bytes | None = None,
    server_nonce: bytes | None = None,
    server_keyshare_seed: bytes | None = None,
    fake_client_private_key: bytes | None = None,
    fake_masking_key: bytes | None = None,
) -> tuple[KE2, ServerLoginState]:
    """RFC 9807 GenerateKE2.

    If ``record`` is None (unknown credential), a fake record is used so that
    the response is indistinguishable in size and shape from a real one; the
    client will then fail at :func:`client_finish_login` and the server at
    :func:`server_finish`.

    Keyword-only arguments are deterministic overrides for test vectors.
    """
    if record is None:
        record = create_fake_record(fake_client_private_key, fake_masking_key)
    credential_identifier = bytes(credential_identifier)
    blinded = _check_element("blinded_message", ke1.credential_request.blinded_message)
    client_keyshare = _check_element(
        "client_public_keyshare", ke1.auth_request.client_public_keyshare
    )
    client_public_key = _check_element("client_public_key", record.client_public_key)

    # CreateCredentialResponse
    oprf_key = _derive_oprf_key(setup.oprf_seed, credential_identifier)
    evaluated = _scalar_mult(oprf_key, blinded)
    m_nonce = _random_or("masking_nonce", masking_nonce, NN)
    pad = _expand(record.masking_key, m_nonce + b"CredentialResponsePad", MASKED_RESPONSE_LEN)
    masked = _xor(pad, setup.server_public_key + record.envelope.serialize())
    credential_response = CredentialResponse(evaluated, m_nonce, masked)

    # AuthServerRespond
    _, sid, cid = _cleartext_credentials(
        setup.server_public_key, client_public_key, server_identity, client_identity
    )
    s_nonce = _random_or("server_nonce", server_nonce, NN)
    seed = _random_or("server_keyshare_seed", server_keyshare_seed, NSEED)
    server_private_keyshare, server_public_keyshare = derive_diffie_hellman_key_pair(seed)
    preamble = _preamble(
        bytes(context), cid, ke1, sid, credential_response, s_nonce, server_public_keyshare
    )
    ikm = (
        _scalar_mult(server_private_keyshare, client_keyshare)
        + _scalar_mult(setup.server_private_key, client_keyshare)
        + _scalar_mult(server_private_keyshare, client_public_key)
    )
    keys = _derive_keys(ikm, preamble)
    server_mac = _mac(keys.server_mac_key, _hash(preamble))
    expected_client_mac = _mac(keys.client_mac_key, _hash(preamble + server_mac))

    ke2 = KE2(credential_response, AuthResponse(s_nonce, server_public_keyshare, server_mac))
    return ke2, ServerLoginState(expected_client_mac, keys.session_key)


def server_finish(state: ServerLoginState, ke3: KE3) -> bytes:
    """RFC 9807 ServerFinish: verify the client MAC and return the session key."""
    if not _stdlib_hmac.compare_digest(state.expected_client_mac, ke3.client_mac):
        raise ClientAuthenticationError("client authentication failed (bad KE3 MAC)")
    return state.session_key


def client_finish_login(
    state: ClientLoginState,
    ke2: KE2,
    ksf: KSF,
    context: bytes = DEFAULT_CONTEXT,
    server_identity: bytes | None = None,
    client_identity: bytes | None = None,
) -> tuple[KE3, bytes, bytes]:
    """RFC 9807 GenerateKE3 -> (KE3, session_key, export_key).

    Raises :class:`EnvelopeRecoveryError` if the envelope cannot be opened
    (wrong password, unknown user / fake record, or wrong server identity) and
    :class:`ServerAuthenticationError` if the server MAC does not verify.
    """
    cred = ke2.credential_response
    auth = ke2.auth_response

    # RecoverCredentials
    evaluated = _check_element("evaluated_message", cred.evaluated_message)
    oprf_output = _oprf_finalize(state.password, state.blind, evaluated)
    randomized_password = _randomized_password(oprf_output, ksf)
    masking_key = _expand(randomized_password, b"MaskingKey", NH)
    pad = _expand(masking_key, cred.masking_nonce + b"CredentialResponsePad", MASKED_RESPONSE_LEN)
    unmasked = _xor(pad, cred.masked_response)
    server_public_key = unmasked[:NPK]
    envelope = Envelope.deserialize(unmasked[NPK:])
    if server_public_key == _IDENTITY or not rbcl.crypto_core_ristretto255_is_valid_point(
        server_public_key
    ):
        # An invalid unmasked key means the masking key (i.e. password) is wrong.
        raise EnvelopeRecoveryError("envelope recovery failed")

    # Recover (envelope)
    keys = _envelope_keys(randomized_password, envelope.nonce)
    cleartext, sid, cid = _cleartext_credentials(
        server_public_key, keys.client_public_key, server_identity, client_identity
    )
    expected_tag = _mac(keys.auth_key, envelope.nonce + cleartext)
    if not _stdlib_hmac.compare_digest(expected_tag, envelope.auth_tag):
        raise EnvelopeRecoveryError("envelope recovery failed")

    # AuthClientFinalize
    server_keyshare = _check_element("server_public_keyshare", auth.server_public_keyshare)
    preamble = _preamble(
        bytes(context),
        cid,
        state.ke1,
        sid,
        cred,
        auth.server_nonce,
        server_keyshare,
    )
    ikm = (
        _scalar_mult(state.client_secret, server_keyshare)
        + _scalar_mult(state.client_secret, server_public_key)
        + _scalar_mult(keys.client_private_key, server_keyshare)
    )
    ake = _derive_keys(ikm, preamble)
    expected_server_mac = _mac(ake.server_mac_key, _hash(preamble))
    if not _stdlib_hmac.compare_digest(expected_server_mac, auth.server_mac):
        raise ServerAuthenticationError("server authentication failed (bad KE2 MAC)")
    client_mac = _mac(ake.client_mac_key, _hash(preamble + auth.server_mac))
    return KE3(client_mac), ake.session_key, keys.export_key
