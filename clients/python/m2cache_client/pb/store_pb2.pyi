from m2cache_client.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SharedRegion(_message.Message):
    __slots__ = ("name", "tag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    tag: bytes
    def __init__(self, name: _Optional[str] = ..., tag: _Optional[bytes] = ...) -> None: ...

class SharedSocketRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SharedSocketInfo(_message.Message):
    __slots__ = ("socket_path", "token")
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    socket_path: str
    token: bytes
    def __init__(self, socket_path: _Optional[str] = ..., token: _Optional[bytes] = ...) -> None: ...

class RegisterRegion(_message.Message):
    __slots__ = ("capacity", "tag", "token")
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    capacity: int
    tag: bytes
    token: bytes
    def __init__(self, capacity: _Optional[int] = ..., tag: _Optional[bytes] = ..., token: _Optional[bytes] = ...) -> None: ...

class RegionRegistered(_message.Message):
    __slots__ = ("region", "capacity")
    REGION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    region: SharedRegion
    capacity: int
    def __init__(self, region: _Optional[_Union[SharedRegion, _Mapping]] = ..., capacity: _Optional[int] = ...) -> None: ...

class SharedOpened(_message.Message):
    __slots__ = ("socket_path", "capacity")
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    socket_path: str
    capacity: int
    def __init__(self, socket_path: _Optional[str] = ..., capacity: _Optional[int] = ...) -> None: ...

class SharedReadRequest(_message.Message):
    __slots__ = ("batch", "region", "offset", "resident_only")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ONLY_FIELD_NUMBER: _ClassVar[int]
    batch: _common_pb2.NeuronBatchRequest
    region: SharedRegion
    offset: int
    resident_only: bool
    def __init__(self, batch: _Optional[_Union[_common_pb2.NeuronBatchRequest, _Mapping]] = ..., region: _Optional[_Union[SharedRegion, _Mapping]] = ..., offset: _Optional[int] = ..., resident_only: _Optional[bool] = ...) -> None: ...

class SharedReadResponse(_message.Message):
    __slots__ = ("record_bytes", "crc32c", "codec", "record_lengths", "nbytes", "verified", "absent", "resident_unsupported")
    RECORD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RECORD_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    ABSENT_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_UNSUPPORTED_FIELD_NUMBER: _ClassVar[int]
    record_bytes: int
    crc32c: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    record_lengths: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    verified: bool
    absent: _containers.RepeatedScalarFieldContainer[int]
    resident_unsupported: bool
    def __init__(self, record_bytes: _Optional[int] = ..., crc32c: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., record_lengths: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., verified: _Optional[bool] = ..., absent: _Optional[_Iterable[int]] = ..., resident_unsupported: _Optional[bool] = ...) -> None: ...

class ReleaseRegionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RecordFileRequest(_message.Message):
    __slots__ = ("model", "layer", "precision", "region", "want_fd")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    WANT_FD_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: int
    precision: _common_pb2.Precision
    region: SharedRegion
    want_fd: bool
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[int] = ..., precision: _Optional[_Union[_common_pb2.Precision, str]] = ..., region: _Optional[_Union[SharedRegion, _Mapping]] = ..., want_fd: _Optional[bool] = ...) -> None: ...

class RecordFileResponse(_message.Message):
    __slots__ = ("segment_offset", "record_bytes", "crc32c", "file_bytes", "fd_attached")
    SEGMENT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RECORD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FD_ATTACHED_FIELD_NUMBER: _ClassVar[int]
    segment_offset: int
    record_bytes: int
    crc32c: bytes
    file_bytes: int
    fd_attached: bool
    def __init__(self, segment_offset: _Optional[int] = ..., record_bytes: _Optional[int] = ..., crc32c: _Optional[bytes] = ..., file_bytes: _Optional[int] = ..., fd_attached: _Optional[bool] = ...) -> None: ...

class SocketRequest(_message.Message):
    __slots__ = ("read", "record_file", "register")
    READ_FIELD_NUMBER: _ClassVar[int]
    RECORD_FILE_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    read: SharedReadRequest
    record_file: RecordFileRequest
    register: RegisterRegion
    def __init__(self, read: _Optional[_Union[SharedReadRequest, _Mapping]] = ..., record_file: _Optional[_Union[RecordFileRequest, _Mapping]] = ..., register: _Optional[_Union[RegisterRegion, _Mapping]] = ...) -> None: ...

class SocketResponse(_message.Message):
    __slots__ = ("read", "record_file", "registered", "error_code", "error")
    READ_FIELD_NUMBER: _ClassVar[int]
    RECORD_FILE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    read: SharedReadResponse
    record_file: RecordFileResponse
    registered: RegionRegistered
    error_code: str
    error: str
    def __init__(self, read: _Optional[_Union[SharedReadResponse, _Mapping]] = ..., record_file: _Optional[_Union[RecordFileResponse, _Mapping]] = ..., registered: _Optional[_Union[RegionRegistered, _Mapping]] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
