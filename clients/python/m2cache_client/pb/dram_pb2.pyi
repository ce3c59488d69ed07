from m2cache_client.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DramFetchRequest(_message.Message):
    __slots__ = ("batch", "current_layer", "caller_id")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LAYER_FIELD_NUMBER: _ClassVar[int]
    CALLER_ID_FIELD_NUMBER: _ClassVar[int]
    batch: _common_pb2.NeuronBatchRequest
    current_layer: int
    caller_id: str
    def __init__(self, batch: _Optional[_Union[_common_pb2.NeuronBatchRequest, _Mapping]] = ..., current_layer: _Optional[int] = ..., caller_id: _Optional[str] = ...) -> None: ...

class LayerStats(_message.Message):
    __slots__ = ("layer", "hits", "misses", "model")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hits: int
    misses: int
    model: str
    def __init__(self, layer: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class DramStats(_message.Message):
    __slots__ = ("layers", "bytes_from_redis", "bytes_from_store", "bytes_resident", "budget_bytes", "preloads", "preload_misses", "mean_preload_lead", "redis_up", "evictions", "bytes_preloaded", "preloads_skipped", "checksum_refetches")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FROM_REDIS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FROM_STORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRELOADS_FIELD_NUMBER: _ClassVar[int]
    PRELOAD_MISSES_FIELD_NUMBER: _ClassVar[int]
    MEAN_PRELOAD_LEAD_FIELD_NUMBER: _ClassVar[int]
    REDIS_UP_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PRELOADED_FIELD_NUMBER: _ClassVar[int]
    PRELOADS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_REFETCHES_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerStats]
    bytes_from_redis: int
    bytes_from_store: int
    bytes_resident: int
    budget_bytes: int
    preloads: int
    preload_misses: int
    mean_preload_lead: float
    redis_up: bool
    evictions: int
    bytes_preloaded: int
    preloads_skipped: int
    checksum_refetches: int
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerStats, _Mapping]]] = ..., bytes_from_redis: _Optional[int] = ..., bytes_from_store: _Optional[int] = ..., bytes_resident: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., preloads: _Optional[int] = ..., preload_misses: _Optional[int] = ..., mean_preload_lead: _Optional[float] = ..., redis_up: _Optional[bool] = ..., evictions: _Optional[int] = ..., bytes_preloaded: _Optional[int] = ..., preloads_skipped: _Optional[int] = ..., checksum_refetches: _Optional[int] = ...) -> None: ...
