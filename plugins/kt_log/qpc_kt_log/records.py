"""Log records, their storage encoding and the signed-tree-head bytes (sans-I/O).

Shared by the server (:mod:`qpc_kt_log.service`) and the client SDK
(:mod:`qpc_kt_log.client`); nothing here does I/O.

Signed tree head
----------------
The log's Ed25519 key signs exactly::

    "qpc-v1 kt-sth" || 0x00        14 bytes, context label
    || tree_size                   u64 big-endian
    || root_hash                   32 bytes (SHA-256 Merkle tree hash, REFERENCE section 7)
    || timestamp_ms                u64 big-endian, unix milliseconds when the head was signed

(64 bytes in total, see :func:`sth_signed_bytes`).

Stored entry (one per leaf, in the storage log ``kt_log``)
----------------------------------------------------------
::

    version      u8   (1)
    kind         u8   (0 = binding, 2 = revocation: the leaf-hash prefix byte)
    timestamp_ms u64  big-endian, when the leaf was appended (not covered by the leaf hash)
    n_hashes     u8   number of node hashes that follow (1 + trailing 1 bits of the index)
    hashes       n_hashes * 32 bytes: the leaf hash, then each ancestor this leaf completed,
                 bottom-up (merkle.nodes_completed_by)
    text_len     u16  big-endian
    text         UTF-8: the username (binding) or the reason (revocation)
    key_len      u8
    identity_key key_len bytes

Keeping a leaf's record and the nodes its append completed in one entry makes every append a
single ``log_append`` (one transaction): a leaf is never stored without its nodes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from qpc_kt_log.merkle import HASH_SIZE, binding_leaf_hash, revocation_leaf_hash

__all__ = [
    "ENTRY_VERSION",
    "KIND_BINDING",
    "KIND_REVOCATION",
    "REVOCATION_REASONS",
    "STH_CONTEXT",
    "CorruptEntry",
    "LeafRecord",
    "decode_entry",
    "encode_entry",
    "entry_hashes",
    "sth_signed_bytes",
]

KIND_BINDING: Final = 0
KIND_REVOCATION: Final = 2
REVOCATION_REASONS: Final = ("compromised", "superseded", "UserRevoked")
"""The revocation reasons REFERENCE section 7 allows (case-sensitive)."""

STH_CONTEXT: Final = b"qpc-v1 kt-sth\x00"
ENTRY_VERSION: Final = 1
IDENTITY_KEY_LEN: Final = 32

_HEADER = struct.Struct(">BBQB")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_MAX_U64 = (1 << 64) - 1


def sth_signed_bytes(tree_size: int, root_hash: bytes, timestamp_ms: int) -> bytes:
    """The exact bytes the log key signs for a tree head (see the module docstring)."""
    if not 0 <= tree_size <= _MAX_U64 or not 0 <= timestamp_ms <= _MAX_U64:
        raise ValueError("tree_size and timestamp_ms must fit in a u64")
    if len(root_hash) != HASH_SIZE:
        raise ValueError(f"root_hash must be {HASH_SIZE} bytes")
    return STH_CONTEXT + _U64.pack(tree_size) + bytes(root_hash) + _U64.pack(timestamp_ms)


class CorruptEntry(ValueError):
    """A stored entry could not be decoded."""


@dataclass(frozen=True, slots=True)
class LeafRecord:
    """What one leaf says: a (username, identity key) binding or a key revocation."""

    kind: int
    identity_key: bytes
    username: str = ""
    reason: str = ""
    timestamp_ms: int = 0

    @classmethod
    def binding(cls, username: str, identity_key: bytes, timestamp_ms: int = 0) -> LeafRecord:
        if len(identity_key) != IDENTITY_KEY_LEN:
            raise ValueError("identity_key must be exactly 32 bytes")
        if not username or "\x00" in username:
            raise ValueError("username must be non-empty and contain no NUL")
        return cls(KIND_BINDING, bytes(identity_key), username=username,
                   timestamp_ms=timestamp_ms)

    @classmethod
    def revocation(cls, identity_key: bytes, reason: str, timestamp_ms: int = 0) -> LeafRecord:
        if len(identity_key) != IDENTITY_KEY_LEN:
            raise ValueError("identity_key must be exactly 32 bytes")
        if reason not in REVOCATION_REASONS:
            raise ValueError(f"reason must be one of {', '.join(REVOCATION_REASONS)}")
        return cls(KIND_REVOCATION, bytes(identity_key), reason=reason,
                   timestamp_ms=timestamp_ms)

    @property
    def leaf_hash(self) -> bytes:
        """The REFERENCE section 7 leaf hash of this record."""
        if self.kind == KIND_BINDING:
            return binding_leaf_hash(self.username, self.identity_key)
        if self.kind == KIND_REVOCATION:
            return revocation_leaf_hash(self.identity_key, self.reason)
        raise ValueError(f"unknown leaf kind {self.kind}")

    @property
    def text(self) -> str:
        return self.username if self.kind == KIND_BINDING else self.reason


def encode_entry(record: LeafRecord, hashes: Sequence[bytes]) -> bytes:
    """Encode ``record`` with the node hashes its append completed (leaf hash first)."""
    if not 1 <= len(hashes) <= 64 or any(len(h) != HASH_SIZE for h in hashes):
        raise ValueError("an entry carries 1..64 hashes of 32 bytes")
    text = record.text.encode("utf-8")
    if len(text) > 0xFFFF or len(record.identity_key) > 0xFF:
        raise ValueError("entry text or key too long")
    return b"".join((
        _HEADER.pack(ENTRY_VERSION, record.kind, record.timestamp_ms, len(hashes)),
        *hashes,
        _U16.pack(len(text)), text,
        bytes((len(record.identity_key),)), record.identity_key,
    ))


def decode_entry(data: bytes) -> tuple[LeafRecord, list[bytes]]:
    """Inverse of :func:`encode_entry`; :class:`CorruptEntry` on any malformation."""
    try:
        version, kind, ts, n = _HEADER.unpack_from(data, 0)
        if version != ENTRY_VERSION:
            raise CorruptEntry(f"unknown entry version {version}")
        if kind not in (KIND_BINDING, KIND_REVOCATION):
            raise CorruptEntry(f"unknown leaf kind {kind}")
        pos = _HEADER.size
        end = pos + n * HASH_SIZE
        if n < 1 or end > len(data):
            raise CorruptEntry("truncated node hashes")
        hashes = [bytes(data[i : i + HASH_SIZE]) for i in range(pos, end, HASH_SIZE)]
        (text_len,) = _U16.unpack_from(data, end)
        pos = end + _U16.size
        text = bytes(data[pos : pos + text_len]).decode("utf-8")
        pos += text_len
        key_len = data[pos]
        key = bytes(data[pos + 1 : pos + 1 + key_len])
        if len(key) != key_len or pos + 1 + key_len != len(data):
            raise CorruptEntry("bad entry length")
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise CorruptEntry(f"malformed entry: {e}") from None
    if kind == KIND_BINDING:
        record = LeafRecord(KIND_BINDING, key, username=text, timestamp_ms=ts)
    else:
        record = LeafRecord(KIND_REVOCATION, key, reason=text, timestamp_ms=ts)
    return record, hashes


def entry_hashes(data: bytes) -> list[bytes]:
    """Only the node hashes of an encoded entry (the proof path: no text decoding)."""
    if len(data) < _HEADER.size:
        raise CorruptEntry("truncated entry header")
    version, _kind, _ts, n = _HEADER.unpack_from(data, 0)
    end = _HEADER.size + n * HASH_SIZE
    if version != ENTRY_VERSION or n < 1 or end > len(data):
        raise CorruptEntry("malformed entry header")
    return [bytes(data[i : i + HASH_SIZE]) for i in range(_HEADER.size, end, HASH_SIZE)]
