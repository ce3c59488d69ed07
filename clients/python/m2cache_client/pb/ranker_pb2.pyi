from m2cache_client.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BandRatios(_message.Message):
    __slots__ = ("full", "int8", "int4")
    FULL_FIELD_NUMBER: _ClassVar[int]
    INT8_FIELD_NUMBER: _ClassVar[int]
    INT4_FIELD_NUMBER: _ClassVar[int]
    full: float
    int8: float
    int4: float
    def __init__(self, full: _Optional[float] = ..., int8: _Optional[float] = ..., int4: _Optional[float] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("model", "layer", "hidden", "ratios")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    RATIOS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: int
    hidden: _common_pb2.TensorBlob
    ratios: BandRatios
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[int] = ..., hidden: _Optional[_Union[_common_pb2.TensorBlob, _Mapping]] = ..., ratios: _Optional[_Union[BandRatios, _Mapping]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("full_ids", "int8_ids", "int4_ids")
    FULL_IDS_FIELD_NUMBER: _ClassVar[int]
    INT8_IDS_FIELD_NUMBER: _ClassVar[int]
    INT4_IDS_FIELD_NUMBER: _ClassVar[int]
    full_ids: _containers.RepeatedScalarFieldContainer[int]
    int8_ids: _containers.RepeatedScalarFieldContainer[int]
    int4_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, full_ids: _Optional[_Iterable[int]] = ..., int8_ids: _Optional[_Iterable[int]] = ..., int4_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PredictorRequest(_message.Message):
    __slots__ = ("model", "layers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ...) -> None: ...

class PredictorWeights(_message.Message):
    __slots__ = ("model", "version", "tensors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorBlob]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_common_pb2.TensorBlob, _Mapping]]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("model", "text", "rank", "max_tokens", "epochs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    rank: int
    max_tokens: int
    epochs: int
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., rank: _Optional[int] = ..., max_tokens: _Optional[int] = ..., epochs: _Optional[int] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("stage", "step", "total", "loss", "version")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total: int
    loss: float
    version: int
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., loss: _Optional[float] = ..., version: _Optional[int] = ...) -> None: ...
