from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Auth(_message.Message):
    __slots__ = ("access_token", "device_id")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    access_token: bytes
    device_id: bytes
    def __init__(self, access_token: _Optional[bytes] = ..., device_id: _Optional[bytes] = ...) -> None: ...

class AuthEnvelope(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "name", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    name: str
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., name: _Optional[str] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "version", "uptime_secs", "signing_key")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECS_FIELD_NUMBER: _ClassVar[int]
    SIGNING_KEY_FIELD_NUMBER: _ClassVar[int]
    status: str
    version: str
    uptime_secs: int
    signing_key: bytes
    def __init__(self, status: _Optional[str] = ..., version: _Optional[str] = ..., uptime_secs: _Optional[int] = ..., signing_key: _Optional[bytes] = ...) -> None: ...

class AuthChallengeRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class AuthChallengeResponse(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class ProveIdentityRequest(_message.Message):
    __slots__ = ("identity_key", "signature", "auth")
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    signature: bytes
    auth: Auth
    def __init__(self, identity_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class ProveIdentityResponse(_message.Message):
    __slots__ = ("identity_key",)
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    identity_key: bytes
    def __init__(self, identity_key: _Optional[bytes] = ...) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class WhoAmIResponse(_message.Message):
    __slots__ = ("authenticated", "auth_kind", "identity_key", "username")
    AUTHENTICATED_FIELD_NUMBER: _ClassVar[int]
    AUTH_KIND_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    authenticated: bool
    auth_kind: str
    identity_key: bytes
    username: str
    def __init__(self, authenticated: _Optional[bool] = ..., auth_kind: _Optional[str] = ..., identity_key: _Optional[bytes] = ..., username: _Optional[str] = ...) -> None: ...

class LogoutRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class LogoutResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NewMessageEvent(_message.Message):
    __slots__ = ("recipient_key", "channel_id", "seq")
    RECIPIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    recipient_key: bytes
    channel_id: bytes
    seq: int
    def __init__(self, recipient_key: _Optional[bytes] = ..., channel_id: _Optional[bytes] = ..., seq: _Optional[int] = ...) -> None: ...

class SessionRevokedEvent(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ServerShuttingDownEvent(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...
