from qpc_core.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("seq", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class EnqueueRequest(_message.Message):
    __slots__ = ("recipient_key", "payload", "channel_id", "ttl_secs", "message_id", "auth")
    RECIPIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    recipient_key: bytes
    payload: bytes
    channel_id: bytes
    ttl_secs: int
    message_id: bytes
    auth: _common_pb2.Auth
    def __init__(self, recipient_key: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., channel_id: _Optional[bytes] = ..., ttl_secs: _Optional[int] = ..., message_id: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class EnqueueResponse(_message.Message):
    __slots__ = ("seq", "delivery_proof", "duplicate")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_PROOF_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    delivery_proof: bytes
    duplicate: bool
    def __init__(self, seq: _Optional[int] = ..., delivery_proof: _Optional[bytes] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("recipient_key", "channel_id", "limit", "device_id", "timeout_ms", "auth")
    RECIPIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    recipient_key: bytes
    channel_id: bytes
    limit: int
    device_id: bytes
    timeout_ms: int
    auth: _common_pb2.Auth
    def __init__(self, recipient_key: _Optional[bytes] = ..., channel_id: _Optional[bytes] = ..., limit: _Optional[int] = ..., device_id: _Optional[bytes] = ..., timeout_ms: _Optional[int] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Envelope]
    def __init__(self, messages: _Optional[_Iterable[_Union[Envelope, _Mapping]]] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("recipient_key", "channel_id", "seq_up_to", "device_id", "auth")
    RECIPIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_UP_TO_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    recipient_key: bytes
    channel_id: bytes
    seq_up_to: int
    device_id: bytes
    auth: _common_pb2.Auth
    def __init__(self, recipient_key: _Optional[bytes] = ..., channel_id: _Optional[bytes] = ..., seq_up_to: _Optional[int] = ..., device_id: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class BatchEnqueueRequest(_message.Message):
    __slots__ = ("recipient_keys", "payload", "channel_id", "ttl_secs", "message_id", "auth")
    RECIPIENT_KEYS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    recipient_keys: _containers.RepeatedScalarFieldContainer[bytes]
    payload: bytes
    channel_id: bytes
    ttl_secs: int
    message_id: bytes
    auth: _common_pb2.Auth
    def __init__(self, recipient_keys: _Optional[_Iterable[bytes]] = ..., payload: _Optional[bytes] = ..., channel_id: _Optional[bytes] = ..., ttl_secs: _Optional[int] = ..., message_id: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class BatchEnqueueResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EnqueueResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[EnqueueResponse, _Mapping]]] = ...) -> None: ...
