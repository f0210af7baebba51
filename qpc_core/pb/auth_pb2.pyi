from qpc_core.pb import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpaqueRegisterStartRequest(_message.Message):
    __slots__ = ("username", "request", "auth")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    username: str
    request: bytes
    auth: _common_pb2.Auth
    def __init__(self, username: _Optional[str] = ..., request: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class OpaqueRegisterStartResponse(_message.Message):
    __slots__ = ("response",)
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    response: bytes
    def __init__(self, response: _Optional[bytes] = ...) -> None: ...

class OpaqueRegisterFinishRequest(_message.Message):
    __slots__ = ("username", "upload", "identity_key", "signature", "auth")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    username: str
    upload: bytes
    identity_key: bytes
    signature: bytes
    auth: _common_pb2.Auth
    def __init__(self, username: _Optional[str] = ..., upload: _Optional[bytes] = ..., identity_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class OpaqueRegisterFinishResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class OpaqueLoginStartRequest(_message.Message):
    __slots__ = ("username", "request", "auth")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    username: str
    request: bytes
    auth: _common_pb2.Auth
    def __init__(self, username: _Optional[str] = ..., request: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class OpaqueLoginStartResponse(_message.Message):
    __slots__ = ("response",)
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    response: bytes
    def __init__(self, response: _Optional[bytes] = ...) -> None: ...

class OpaqueLoginFinishRequest(_message.Message):
    __slots__ = ("username", "finalization", "identity_key", "signature", "auth")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    FINALIZATION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    username: str
    finalization: bytes
    identity_key: bytes
    signature: bytes
    auth: _common_pb2.Auth
    def __init__(self, username: _Optional[str] = ..., finalization: _Optional[bytes] = ..., identity_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class OpaqueLoginFinishResponse(_message.Message):
    __slots__ = ("session_token", "expires_at")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    session_token: bytes
    expires_at: int
    def __init__(self, session_token: _Optional[bytes] = ..., expires_at: _Optional[int] = ...) -> None: ...
