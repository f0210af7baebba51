from qpc_core.pb import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadBlobRequest(_message.Message):
    __slots__ = ("blob_hash", "chunk", "offset", "total_size", "mime_type", "auth")
    BLOB_HASH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    blob_hash: bytes
    chunk: bytes
    offset: int
    total_size: int
    mime_type: str
    auth: _common_pb2.Auth
    def __init__(self, blob_hash: _Optional[bytes] = ..., chunk: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., mime_type: _Optional[str] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class UploadBlobResponse(_message.Message):
    __slots__ = ("blob_id", "received", "complete")
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    blob_id: bytes
    received: int
    complete: bool
    def __init__(self, blob_id: _Optional[bytes] = ..., received: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class DownloadBlobRequest(_message.Message):
    __slots__ = ("blob_id", "offset", "length", "auth")
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    blob_id: bytes
    offset: int
    length: int
    auth: _common_pb2.Auth
    def __init__(self, blob_id: _Optional[bytes] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class DownloadBlobResponse(_message.Message):
    __slots__ = ("chunk", "offset", "total_size", "mime_type")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    offset: int
    total_size: int
    mime_type: str
    def __init__(self, chunk: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., mime_type: _Optional[str] = ...) -> None: ...

class BlobUploadStatusRequest(_message.Message):
    __slots__ = ("blob_hash", "auth")
    BLOB_HASH_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    blob_hash: bytes
    auth: _common_pb2.Auth
    def __init__(self, blob_hash: _Optional[bytes] = ..., auth: _Optional[_Union[_common_pb2.Auth, _Mapping]] = ...) -> None: ...

class BlobUploadStatusResponse(_message.Message):
    __slots__ = ("received", "total_size", "complete")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    received: int
    total_size: int
    complete: bool
    def __init__(self, received: _Optional[int] = ..., total_size: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...
