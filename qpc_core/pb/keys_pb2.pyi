from qpc_core.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadKeyPackageRequest(_message.Message):
    __slots__ = ("identity_key", "package", "auth")
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    package: bytes
    auth: _common_pb2.Auth
    def __init__(self, identity_key: _Optional[bytes] = ..., package: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class UploadKeyPackageResponse(_message.Message):
    __slots__ = ("fingerprint",)
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: bytes
    def __init__(self, fingerprint: _Optional[bytes] = ...) -> None: ...

class FetchKeyPackageRequest(_message.Message):
    __slots__ = ("identity_key", "auth")
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    auth: _common_pb2.Auth
    def __init__(self, identity_key: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class FetchKeyPackageResponse(_message.Message):
    __slots__ = ("package",)
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    package: bytes
    def __init__(self, package: _Optional[bytes] = ...) -> None: ...

class UploadHybridKeyRequest(_message.Message):
    __slots__ = ("identity_key", "hybrid_public_key", "auth")
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    HYBRID_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    hybrid_public_key: bytes
    auth: _common_pb2.Auth
    def __init__(self, identity_key: _Optional[bytes] = ..., hybrid_public_key: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class UploadHybridKeyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchHybridKeyRequest(_message.Message):
    __slots__ = ("identity_key", "auth")
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    auth: _common_pb2.Auth
    def __init__(self, identity_key: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class FetchHybridKeyResponse(_message.Message):
    __slots__ = ("hybrid_public_key",)
    HYBRID_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    hybrid_public_key: bytes
    def __init__(self, hybrid_public_key: _Optional[bytes] = ...) -> None: ...

class FetchHybridKeysRequest(_message.Message):
    __slots__ = ("identity_keys", "auth")
    IDENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    identity_keys: _containers.RepeatedScalarFieldContainer[bytes]
    auth: _common_pb2.Auth
    def __init__(self, identity_keys: _Optional[_Iterable[bytes]] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class HybridKeyEntry(_message.Message):
    __slots__ = ("identity_key", "hybrid_public_key")
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    HYBRID_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    hybrid_public_key: bytes
    def __init__(self, identity_key: _Optional[bytes] = ..., hybrid_public_key: _Optional[bytes] = ...) -> None: ...

class FetchHybridKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[HybridKeyEntry]
    def __init__(self, keys: _Optional[_Iterable[_Union[HybridKeyEntry, _Mapping]]] = ...) -> None: ...
