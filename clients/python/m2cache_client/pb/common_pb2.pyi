from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    FULL: _ClassVar[Precision]
    INT8: _ClassVar[Precision]
    INT4: _ClassVar[Precision]
PRECISION_UNSPECIFIED: Precision
FULL: Precision
INT8: Precision
INT4: Precision

class TensorBlob(_message.Message):
    __slots__ = ("name", "data", "shape", "dtype", "crc32")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    crc32: int
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., crc32: _Optional[int] = ...) -> None: ...

class NeuronBatchRequest(_message.Message):
    __slots__ = ("model", "layer", "neuron_ids", "precision", "all_neurons")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NEURON_IDS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ALL_NEURONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: int
    neuron_ids: _containers.RepeatedScalarFieldContainer[int]
    precision: Precision
    all_neurons: bool
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[int] = ..., neuron_ids: _Optional[_Iterable[int]] = ..., precision: _Optional[_Union[Precision, str]] = ..., all_neurons: _Optional[bool] = ...) -> None: ...

class NeuronBatch(_message.Message):
    __slots__ = ("model", "layer", "precision", "neuron_ids", "record_bytes", "payload", "crc32c", "codec", "record_lengths", "first")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    NEURON_IDS_FIELD_NUMBER: _ClassVar[int]
    RECORD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RECORD_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: int
    precision: Precision
    neuron_ids: _containers.RepeatedScalarFieldContainer[int]
    record_bytes: int
    payload: bytes
    crc32c: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    record_lengths: _containers.RepeatedScalarFieldContainer[int]
    first: int
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[int] = ..., precision: _Optional[_Union[Precision, str]] = ..., neuron_ids: _Optional[_Iterable[int]] = ..., record_bytes: _Optional[int] = ..., payload: _Optional[bytes] = ..., crc32c: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., record_lengths: _Optional[_Iterable[int]] = ..., first: _Optional[int] = ...) -> None: ...

class DenseRequest(_message.Message):
    __slots__ = ("model", "names")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    model: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class DenseBatch(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorBlob]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorBlob, _Mapping]]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "offset", "data", "shape", "dtype", "crc32", "total_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    crc32: int
    total_bytes: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., crc32: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class ManifestRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("model", "manifest_json", "policy_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    manifest_json: str
    policy_json: str
    def __init__(self, model: _Optional[str] = ..., manifest_json: _Optional[str] = ..., policy_json: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class FileRequest(_message.Message):
    __slots__ = ("model", "filename")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    model: str
    filename: str
    def __init__(self, model: _Optional[str] = ..., filename: _Optional[str] = ...) -> None: ...

class FileBlob(_message.Message):
    __slots__ = ("filename", "data")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    filename: str
    data: bytes
    def __init__(self, filename: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
