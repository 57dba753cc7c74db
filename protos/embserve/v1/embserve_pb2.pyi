from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class RowFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROW_FORMAT_UNSPECIFIED: _ClassVar[RowFormat]
    ROW_FORMAT_FLOAT32: _ClassVar[RowFormat]
    ROW_FORMAT_SERVING: _ClassVar[RowFormat]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
ROW_FORMAT_UNSPECIFIED: RowFormat
ROW_FORMAT_FLOAT32: RowFormat
ROW_FORMAT_SERVING: RowFormat

class SparseFeatures(_message.Message):
    __slots__ = ("keys", "batch_size", "lengths", "values", "weights")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    batch_size: int
    lengths: bytes
    values: bytes
    weights: bytes
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., batch_size: _Optional[int] = ..., lengths: _Optional[bytes] = ..., values: _Optional[bytes] = ..., weights: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("features", "output_dtype", "request_id", "timeout_ms", "requests")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    features: SparseFeatures
    output_dtype: DType
    request_id: str
    timeout_ms: int
    requests: _containers.RepeatedCompositeFieldContainer[LookupRequest]
    def __init__(self, features: _Optional[_Union[SparseFeatures, _Mapping]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., request_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[LookupRequest, _Mapping]]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("dtype", "shape", "embeddings", "keys", "dims", "offsets", "model_name", "model_version", "request_id", "status", "responses")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    embeddings: bytes
    keys: _containers.RepeatedScalarFieldContainer[str]
    dims: _containers.RepeatedScalarFieldContainer[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    model_name: str
    model_version: str
    request_id: str
    status: Status
    responses: _containers.RepeatedCompositeFieldContainer[LookupResponse]
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., embeddings: _Optional[bytes] = ..., keys: _Optional[_Iterable[str]] = ..., dims: _Optional[_Iterable[int]] = ..., offsets: _Optional[_Iterable[int]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., responses: _Optional[_Iterable[_Union[LookupResponse, _Mapping]]] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableMetadata(_message.Message):
    __slots__ = ("name", "feature_names", "num_embeddings", "embedding_dim", "data_type", "serving_dtype", "weight_bytes", "weighted", "id_policy", "storage", "disk_bytes", "resident_bytes", "row_start", "table_rows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVING_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_FIELD_NUMBER: _ClassVar[int]
    ID_POLICY_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    TABLE_ROWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    num_embeddings: int
    embedding_dim: int
    data_type: str
    serving_dtype: str
    weight_bytes: int
    weighted: bool
    id_policy: str
    storage: str
    disk_bytes: int
    resident_bytes: int
    row_start: int
    table_rows: int
    def __init__(self, name: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ..., num_embeddings: _Optional[int] = ..., embedding_dim: _Optional[int] = ..., data_type: _Optional[str] = ..., serving_dtype: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., weighted: _Optional[bool] = ..., id_policy: _Optional[str] = ..., storage: _Optional[str] = ..., disk_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., row_start: _Optional[int] = ..., table_rows: _Optional[int] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("name", "version", "tables", "keys", "output_dim", "device", "engine", "max_batch_size", "max_request_examples", "max_request_ids", "max_message_bytes", "max_stream_outstanding", "max_response_bytes", "max_queue_bytes", "max_pending_response_bytes", "max_pending_response_bytes_per_connection", "max_receive_bytes", "plan_digest", "shard_index", "shard_count", "model_keys", "max_stream_batch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PENDING_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PENDING_RESPONSE_BYTES_PER_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    MAX_RECEIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLAN_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_BATCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    tables: _containers.RepeatedCompositeFieldContainer[TableMetadata]
    keys: _containers.RepeatedScalarFieldContainer[str]
    output_dim: int
    device: str
    engine: str
    max_batch_size: int
    max_request_examples: int
    max_request_ids: int
    max_message_bytes: int
    max_stream_outstanding: int
    max_response_bytes: int
    max_queue_bytes: int
    max_pending_response_bytes: int
    max_pending_response_bytes_per_connection: int
    max_receive_bytes: int
    plan_digest: str
    shard_index: int
    shard_count: int
    model_keys: _containers.RepeatedScalarFieldContainer[str]
    max_stream_batch: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableMetadata, _Mapping]]] = ..., keys: _Optional[_Iterable[str]] = ..., output_dim: _Optional[int] = ..., device: _Optional[str] = ..., engine: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., max_request_examples: _Optional[int] = ..., max_request_ids: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_stream_outstanding: _Optional[int] = ..., max_response_bytes: _Optional[int] = ..., max_queue_bytes: _Optional[int] = ..., max_pending_response_bytes: _Optional[int] = ..., max_pending_response_bytes_per_connection: _Optional[int] = ..., max_receive_bytes: _Optional[int] = ..., plan_digest: _Optional[str] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., model_keys: _Optional[_Iterable[str]] = ..., max_stream_batch: _Optional[int] = ...) -> None: ...

class RowUpdate(_message.Message):
    __slots__ = ("update_id", "table", "ids", "rows", "format")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    table: str
    ids: bytes
    rows: bytes
    format: RowFormat
    def __init__(self, update_id: _Optional[str] = ..., table: _Optional[str] = ..., ids: _Optional[bytes] = ..., rows: _Optional[bytes] = ..., format: _Optional[_Union[RowFormat, str]] = ...) -> None: ...

class RowUpdateResult(_message.Message):
    __slots__ = ("update_id", "status", "sequence", "model_version", "rows")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    status: Status
    sequence: int
    model_version: str
    rows: int
    def __init__(self, update_id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., sequence: _Optional[int] = ..., model_version: _Optional[str] = ..., rows: _Optional[int] = ...) -> None: ...
