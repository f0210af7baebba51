from qpc_core.pb import common_pb2 as _common_pb2
from qpc_core.pb import delivery_pb2 as _delivery_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RelayEnqueueRequest(_message.Message):
    __slots__ = ("origin_domain", "sender_key", "message")
    ORIGIN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SENDER_KEY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    origin_domain: str
    sender_key: bytes
    message: _delivery_pb2.EnqueueRequest
    def __init__(self, origin_domain: _Optional[str] = ..., sender_key: _Optional[bytes] = ..., message: _Optional[_Union[_delivery_pb2.EnqueueRequest, _Mapping]] = ...) -> None: ...

class RelayBatchEnqueueRequest(_message.Message):
    __slots__ = ("origin_domain", "sender_key", "batch")
    ORIGIN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SENDER_KEY_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    origin_domain: str
    sender_key: bytes
    batch: _delivery_pb2.BatchEnqueueRequest
    def __init__(self, origin_domain: _Optional[str] = ..., sender_key: _Optional[bytes] = ..., batch: _Optional[_Union[_delivery_pb2.BatchEnqueueRequest, _Mapping]] = ...) -> None: ...

class ProxyFetchKeyPackageRequest(_message.Message):
    __slots__ = ("origin_domain", "identity_key")
    ORIGIN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    origin_domain: str
    identity_key: bytes
    def __init__(self, origin_domain: _Optional[str] = ..., identity_key: _Optional[bytes] = ...) -> None: ...

class ProxyFetchHybridKeyRequest(_message.Message):
    __slots__ = ("origin_domain", "identity_key")
    ORIGIN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    origin_domain: str
    identity_key: bytes
    def __init__(self, origin_domain: _Optional[str] = ..., identity_key: _Optional[bytes] = ...) -> None: ...

class ProxyResolveUserRequest(_message.Message):
    __slots__ = ("origin_domain", "username")
    ORIGIN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    origin_domain: str
    username: str
    def __init__(self, origin_domain: _Optional[str] = ..., username: _Optional[str] = ...) -> None: ...

class FederationHealthRequest(_message.Message):
    __slots__ = ("origin_domain",)
    ORIGIN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    origin_domain: str
    def __init__(self, origin_domain: _Optional[str] = ...) -> None: ...

class FederationHealthResponse(_message.Message):
    __slots__ = ("status", "domain")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    status: str
    domain: str
    def __init__(self, status: _Optional[str] = ..., domain: _Optional[str] = ...) -> None: ...

class FederationLookupRequest(_message.Message):
    __slots__ = ("origin_domain", "identity_keys")
    ORIGIN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    origin_domain: str
    identity_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, origin_domain: _Optional[str] = ..., identity_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FederationLookupResponse(_message.Message):
    __slots__ = ("hosted",)
    HOSTED_FIELD_NUMBER: _ClassVar[int]
    hosted: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, hosted: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FederationAnnounceRequest(_message.Message):
    __slots__ = ("origin_domain", "hosted", "gone")
    ORIGIN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    HOSTED_FIELD_NUMBER: _ClassVar[int]
    GONE_FIELD_NUMBER: _ClassVar[int]
    origin_domain: str
    hosted: _containers.RepeatedScalarFieldContainer[bytes]
    gone: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, origin_domain: _Optional[str] = ..., hosted: _Optional[_Iterable[bytes]] = ..., gone: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FederationAnnounceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RelayEnqueueManyRequest(_message.Message):
    __slots__ = ("origin_domain", "items")
    ORIGIN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    origin_domain: str
    items: _containers.RepeatedCompositeFieldContainer[RelayEnqueueRequest]
    def __init__(self, origin_domain: _Optional[str] = ..., items: _Optional[_Iterable[_Union[RelayEnqueueRequest, _Mapping]]] = ...) -> None: ...

class RelayEnqueueItemResult(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: _delivery_pb2.EnqueueResponse
    error: _common_pb2.Error
    def __init__(self, ok: _Optional[_Union[_delivery_pb2.EnqueueResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class RelayEnqueueManyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RelayEnqueueItemResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RelayEnqueueItemResult, _Mapping]]] = ...) -> None: ...
