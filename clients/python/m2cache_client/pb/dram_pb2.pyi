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

class DataPlaneRequest(_message.Message):
    __slots__ = ("model", "caller_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CALLER_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    caller_id: str
    def __init__(self, model: _Optional[str] = ..., caller_id: _Optional[str] = ...) -> None: ...

class DataPlaneInfo(_message.Message):
    __slots__ = ("redis_url", "key_prefix", "store_target", "redis_password", "mac_key", "redis_run_id")
    REDIS_URL_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    STORE_TARGET_FIELD_NUMBER: _ClassVar[int]
    REDIS_PASSWORD_FIELD_NUMBER: _ClassVar[int]
    MAC_KEY_FIELD_NUMBER: _ClassVar[int]
    REDIS_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    redis_url: str
    key_prefix: str
    store_target: str
    redis_password: bytes
    mac_key: bytes
    redis_run_id: str
    def __init__(self, redis_url: _Optional[str] = ..., key_prefix: _Optional[str] = ..., store_target: _Optional[str] = ..., redis_password: _Optional[bytes] = ..., mac_key: _Optional[bytes] = ..., redis_run_id: _Optional[str] = ...) -> None: ...

class LayerUse(_message.Message):
    __slots__ = ("layer", "precision", "used_ids", "missed_ids", "used_bits", "missed_bits")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    USED_IDS_FIELD_NUMBER: _ClassVar[int]
    MISSED_IDS_FIELD_NUMBER: _ClassVar[int]
    USED_BITS_FIELD_NUMBER: _ClassVar[int]
    MISSED_BITS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    precision: _common_pb2.Precision
    used_ids: _containers.RepeatedScalarFieldContainer[int]
    missed_ids: _containers.RepeatedScalarFieldContainer[int]
    used_bits: bytes
    missed_bits: bytes
    def __init__(self, layer: _Optional[int] = ..., precision: _Optional[_Union[_common_pb2.Precision, str]] = ..., used_ids: _Optional[_Iterable[int]] = ..., missed_ids: _Optional[_Iterable[int]] = ..., used_bits: _Optional[bytes] = ..., missed_bits: _Optional[bytes] = ...) -> None: ...

class UsageReport(_message.Message):
    __slots__ = ("model", "caller_id", "current_layer", "uses", "page_cache_first")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CALLER_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LAYER_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    PAGE_CACHE_FIRST_FIELD_NUMBER: _ClassVar[int]
    model: str
    caller_id: str
    current_layer: int
    uses: _containers.RepeatedCompositeFieldContainer[LayerUse]
    page_cache_first: bool
    def __init__(self, model: _Optional[str] = ..., caller_id: _Optional[str] = ..., current_layer: _Optional[int] = ..., uses: _Optional[_Iterable[_Union[LayerUse, _Mapping]]] = ..., page_cache_first: _Optional[bool] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

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
    __slots__ = ("layers", "bytes_from_redis", "bytes_from_store", "bytes_resident", "budget_bytes", "preloads", "preload_misses", "mean_preload_lead", "redis_up", "evictions", "bytes_preloaded", "preloads_skipped", "checksum_refetches", "reports")
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
    REPORTS_FIELD_NUMBER: _ClassVar[int]
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
    reports: int
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerStats, _Mapping]]] = ..., bytes_from_redis: _Optional[int] = ..., bytes_from_store: _Optional[int] = ..., bytes_resident: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., preloads: _Optional[int] = ..., preload_misses: _Optional[int] = ..., mean_preload_lead: _Optional[float] = ..., redis_up: _Optional[bool] = ..., evictions: _Optional[int] = ..., bytes_preloaded: _Optional[int] = ..., preloads_skipped: _Optional[int] = ..., checksum_refetches: _Optional[int] = ..., reports: _Optional[int] = ...) -> None: ...
