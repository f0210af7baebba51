from qpc_core.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignedTreeHead(_message.Message):
    __slots__ = ("tree_size", "root_hash", "timestamp_ms", "signature", "public_key")
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOT_HASH_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    signature: bytes
    public_key: bytes
    def __init__(self, tree_size: _Optional[int] = ..., root_hash: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., signature: _Optional[bytes] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class KtInclusion(_message.Message):
    __slots__ = ("leaf_index", "tree_size", "audit_path", "sth")
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    AUDIT_PATH_FIELD_NUMBER: _ClassVar[int]
    STH_FIELD_NUMBER: _ClassVar[int]
    leaf_index: int
    tree_size: int
    audit_path: _containers.RepeatedScalarFieldContainer[bytes]
    sth: SignedTreeHead
    def __init__(self, leaf_index: _Optional[int] = ..., tree_size: _Optional[int] = ..., audit_path: _Optional[_Iterable[bytes]] = ..., sth: _Optional[_Union[SignedTreeHead, _Mapping]] = ...) -> None: ...

class ResolveUserRequest(_message.Message):
    __slots__ = ("username", "auth")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    username: str
    auth: _common_pb2.Auth
    def __init__(self, username: _Optional[str] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class ResolveUserResponse(_message.Message):
    __slots__ = ("identity_key", "username", "inclusion")
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    INCLUSION_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    username: str
    inclusion: KtInclusion
    def __init__(self, identity_key: _Optional[bytes] = ..., username: _Optional[str] = ..., inclusion: _Optional[_Union[KtInclusion, _Mapping]] = ...) -> None: ...

class ResolveIdentityRequest(_message.Message):
    __slots__ = ("identity_key", "auth")
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    auth: _common_pb2.Auth
    def __init__(self, identity_key: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class ResolveIdentityResponse(_message.Message):
    __slots__ = ("username", "inclusion")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    INCLUSION_FIELD_NUMBER: _ClassVar[int]
    username: str
    inclusion: KtInclusion
    def __init__(self, username: _Optional[str] = ..., inclusion: _Optional[_Union[KtInclusion, _Mapping]] = ...) -> None: ...

class CreateChannelRequest(_message.Message):
    __slots__ = ("member_keys", "auth")
    MEMBER_KEYS_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    member_keys: _containers.RepeatedScalarFieldContainer[bytes]
    auth: _common_pb2.Auth
    def __init__(self, member_keys: _Optional[_Iterable[bytes]] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class CreateChannelResponse(_message.Message):
    __slots__ = ("channel_id", "was_new")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    WAS_NEW_FIELD_NUMBER: _ClassVar[int]
    channel_id: bytes
    was_new: bool
    def __init__(self, channel_id: _Optional[bytes] = ..., was_new: _Optional[bool] = ...) -> None: ...

class DeleteAccountRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: _common_pb2.Auth
    def __init__(self, auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class DeleteAccountResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("identity_key", "reason", "auth")
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    reason: str
    auth: _common_pb2.Auth
    def __init__(self, identity_key: _Optional[bytes] = ..., reason: _Optional[str] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ("leaf_index",)
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    leaf_index: int
    def __init__(self, leaf_index: _Optional[int] = ...) -> None: ...

class CheckRevocationRequest(_message.Message):
    __slots__ = ("identity_key", "auth")
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    auth: _common_pb2.Auth
    def __init__(self, identity_key: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class CheckRevocationResponse(_message.Message):
    __slots__ = ("revoked", "reason", "inclusion")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INCLUSION_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    reason: str
    inclusion: KtInclusion
    def __init__(self, revoked: _Optional[bool] = ..., reason: _Optional[str] = ..., inclusion: _Optional[_Union[KtInclusion, _Mapping]] = ...) -> None: ...

class KtEntry(_message.Message):
    __slots__ = ("index", "kind", "username", "identity_key", "reason", "leaf_hash", "timestamp_ms")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    index: int
    kind: int
    username: str
    identity_key: bytes
    reason: str
    leaf_hash: bytes
    timestamp_ms: int
    def __init__(self, index: _Optional[int] = ..., kind: _Optional[int] = ..., username: _Optional[str] = ..., identity_key: _Optional[bytes] = ..., reason: _Optional[str] = ..., leaf_hash: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class AuditKeyTransparencyRequest(_message.Message):
    __slots__ = ("start", "end", "auth")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    auth: _common_pb2.Auth
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class AuditKeyTransparencyResponse(_message.Message):
    __slots__ = ("entries", "tree_size", "sth")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STH_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[KtEntry]
    tree_size: int
    sth: SignedTreeHead
    def __init__(self, entries: _Optional[_Iterable[_Union[KtEntry, _Mapping]]] = ..., tree_size: _Optional[int] = ..., sth: _Optional[_Union[SignedTreeHead, _Mapping]] = ...) -> None: ...

class GetSignedTreeHeadRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: _common_pb2.Auth
    def __init__(self, auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class GetSignedTreeHeadResponse(_message.Message):
    __slots__ = ("sth",)
    STH_FIELD_NUMBER: _ClassVar[int]
    sth: SignedTreeHead
    def __init__(self, sth: _Optional[_Union[SignedTreeHead, _Mapping]] = ...) -> None: ...

class GetConsistencyProofRequest(_message.Message):
    __slots__ = ("old_size", "new_size", "auth")
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEW_SIZE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    old_size: int
    new_size: int
    auth: _common_pb2.Auth
    def __init__(self, old_size: _Optional[int] = ..., new_size: _Optional[int] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class GetConsistencyProofResponse(_message.Message):
    __slots__ = ("proof",)
    PROOF_FIELD_NUMBER: _ClassVar[int]
    proof: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, proof: _Optional[_Iterable[bytes]] = ...) -> None: ...
