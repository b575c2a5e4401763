from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WriteMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SET: _ClassVar[WriteMode]
    ADD: _ClassVar[WriteMode]
SET: WriteMode
ADD: WriteMode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("version", "parent", "time", "author", "message", "kind", "slots", "checksum", "meta_json", "tags")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    version: int
    parent: int
    time: str
    author: str
    message: str
    kind: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    checksum: str
    meta_json: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., parent: _Optional[int] = ..., time: _Optional[str] = ..., author: _Optional[str] = ..., message: _Optional[str] = ..., kind: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ..., checksum: _Optional[str] = ..., meta_json: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "temperature", "top_k", "seed", "return_logits")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    return_logits: bool
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., return_logits: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "tokens", "stopped_at_eos", "version", "first_logits")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_AT_EOS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGITS_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    stopped_at_eos: bool
    version: int
    first_logits: Tensor
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., stopped_at_eos: _Optional[bool] = ..., version: _Optional[int] = ..., first_logits: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token", "token_text", "version", "done", "text", "stopped_at_eos")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STOPPED_AT_EOS_FIELD_NUMBER: _ClassVar[int]
    token: int
    token_text: str
    version: int
    done: bool
    text: str
    stopped_at_eos: bool
    def __init__(self, token: _Optional[int] = ..., token_text: _Optional[str] = ..., version: _Optional[int] = ..., done: _Optional[bool] = ..., text: _Optional[str] = ..., stopped_at_eos: _Optional[bool] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("prompt",)
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    def __init__(self, prompt: _Optional[str] = ...) -> None: ...

class LayerLookup(_message.Message):
    __slots__ = ("layer", "slots", "weights")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    slots: Tensor
    weights: Tensor
    def __init__(self, layer: _Optional[int] = ..., slots: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("tokens", "token_strings", "layers", "version")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_STRINGS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    token_strings: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedCompositeFieldContainer[LayerLookup]
    version: int
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., token_strings: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[_Union[LayerLookup, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class ReadSlotsRequest(_message.Message):
    __slots__ = ("slots", "version")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedScalarFieldContainer[int]
    version: str
    def __init__(self, slots: _Optional[_Iterable[int]] = ..., version: _Optional[str] = ...) -> None: ...

class ReadSlotsResponse(_message.Message):
    __slots__ = ("rows", "version")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    rows: Tensor
    version: int
    def __init__(self, rows: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class WriteSlotsRequest(_message.Message):
    __slots__ = ("slots", "rows", "mode", "expected_parent", "message", "author")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PARENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedScalarFieldContainer[int]
    rows: Tensor
    mode: WriteMode
    expected_parent: int
    message: str
    author: str
    def __init__(self, slots: _Optional[_Iterable[int]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., mode: _Optional[_Union[WriteMode, str]] = ..., expected_parent: _Optional[int] = ..., message: _Optional[str] = ..., author: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("version", "served_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: Version
    served_version: int
    def __init__(self, version: _Optional[_Union[Version, _Mapping]] = ..., served_version: _Optional[int] = ...) -> None: ...

class Fact(_message.Message):
    __slots__ = ("prompt", "target")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    target: str
    def __init__(self, prompt: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class InjectFactsRequest(_message.Message):
    __slots__ = ("facts", "force", "expected_parent", "message", "author")
    FACTS_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PARENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    facts: _containers.RepeatedCompositeFieldContainer[Fact]
    force: bool
    expected_parent: int
    message: str
    author: str
    def __init__(self, facts: _Optional[_Iterable[_Union[Fact, _Mapping]]] = ..., force: _Optional[bool] = ..., expected_parent: _Optional[int] = ..., message: _Optional[str] = ..., author: _Optional[str] = ...) -> None: ...

class FineTuneRequest(_message.Message):
    __slots__ = ("passages", "expected_parent", "message", "author")
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PARENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedScalarFieldContainer[str]
    expected_parent: int
    message: str
    author: str
    def __init__(self, passages: _Optional[_Iterable[str]] = ..., expected_parent: _Optional[int] = ..., message: _Optional[str] = ..., author: _Optional[str] = ...) -> None: ...

class FactReport(_message.Message):
    __slots__ = ("prompt", "target", "success", "prob_before", "prob_after", "loss_before", "loss_after", "steps", "slots_written", "message", "already_known", "slots")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    PROB_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PROB_AFTER_FIELD_NUMBER: _ClassVar[int]
    LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_KNOWN_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    target: str
    success: bool
    prob_before: float
    prob_after: float
    loss_before: float
    loss_after: float
    steps: int
    slots_written: int
    message: str
    already_known: bool
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt: _Optional[str] = ..., target: _Optional[str] = ..., success: _Optional[bool] = ..., prob_before: _Optional[float] = ..., prob_after: _Optional[float] = ..., loss_before: _Optional[float] = ..., loss_after: _Optional[float] = ..., steps: _Optional[int] = ..., slots_written: _Optional[int] = ..., message: _Optional[str] = ..., already_known: _Optional[bool] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("success", "committed", "version", "served_version", "reports", "slots_written", "seconds", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    committed: bool
    version: Version
    served_version: int
    reports: _containers.RepeatedCompositeFieldContainer[FactReport]
    slots_written: int
    seconds: float
    message: str
    def __init__(self, success: _Optional[bool] = ..., committed: _Optional[bool] = ..., version: _Optional[_Union[Version, _Mapping]] = ..., served_version: _Optional[int] = ..., reports: _Optional[_Iterable[_Union[FactReport, _Mapping]]] = ..., slots_written: _Optional[int] = ..., seconds: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("target", "expected_parent", "message", "author")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PARENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    target: str
    expected_parent: int
    message: str
    author: str
    def __init__(self, target: _Optional[str] = ..., expected_parent: _Optional[int] = ..., message: _Optional[str] = ..., author: _Optional[str] = ...) -> None: ...

class TagRequest(_message.Message):
    __slots__ = ("name", "version", "delete")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    delete: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., delete: _Optional[bool] = ...) -> None: ...

class TagResponse(_message.Message):
    __slots__ = ("name", "version", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    tags: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., tags: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("limit", "before")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    limit: int
    before: str
    def __init__(self, limit: _Optional[int] = ..., before: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions", "head")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[Version]
    head: int
    def __init__(self, versions: _Optional[_Iterable[_Union[Version, _Mapping]]] = ..., head: _Optional[int] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class DiffRequest(_message.Message):
    __slots__ = ("from_version", "to_version", "rows")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    from_version: str
    to_version: str
    rows: bool
    def __init__(self, from_version: _Optional[str] = ..., to_version: _Optional[str] = ..., rows: _Optional[bool] = ...) -> None: ...

class DiffResponse(_message.Message):
    __slots__ = ("from_version", "to_version", "slots", "before", "after")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    to_version: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    before: Tensor
    after: Tensor
    def __init__(self, from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., before: _Optional[_Union[Tensor, _Mapping]] = ..., after: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class WatchVersionsRequest(_message.Message):
    __slots__ = ("from_version",)
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    from_version: str
    def __init__(self, from_version: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("model", "store", "n_slots", "dim", "dtype", "device", "head_version", "served_version", "uptime_seconds", "memory_layers", "max_seq_len", "editor_available", "requests_served", "memslot_version", "oldest_readable")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    N_SLOTS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    EDITOR_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    MEMSLOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    OLDEST_READABLE_FIELD_NUMBER: _ClassVar[int]
    model: str
    store: str
    n_slots: int
    dim: int
    dtype: str
    device: str
    head_version: int
    served_version: int
    uptime_seconds: float
    memory_layers: _containers.RepeatedScalarFieldContainer[int]
    max_seq_len: int
    editor_available: bool
    requests_served: int
    memslot_version: str
    oldest_readable: int
    def __init__(self, model: _Optional[str] = ..., store: _Optional[str] = ..., n_slots: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., head_version: _Optional[int] = ..., served_version: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., memory_layers: _Optional[_Iterable[int]] = ..., max_seq_len: _Optional[int] = ..., editor_available: _Optional[bool] = ..., requests_served: _Optional[int] = ..., memslot_version: _Optional[str] = ..., oldest_readable: _Optional[int] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ("dest_dir",)
    DEST_DIR_FIELD_NUMBER: _ClassVar[int]
    dest_dir: str
    def __init__(self, dest_dir: _Optional[str] = ...) -> None: ...

class BackupResponse(_message.Message):
    __slots__ = ("dest_dir", "head_version")
    DEST_DIR_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    dest_dir: str
    head_version: int
    def __init__(self, dest_dir: _Optional[str] = ..., head_version: _Optional[int] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ("keep_from",)
    KEEP_FROM_FIELD_NUMBER: _ClassVar[int]
    keep_from: str
    def __init__(self, keep_from: _Optional[str] = ...) -> None: ...

class CompactResponse(_message.Message):
    __slots__ = ("keep_from", "rows_folded", "rows_dropped", "chunks_rewritten", "oldest_readable")
    KEEP_FROM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FOLDED_FIELD_NUMBER: _ClassVar[int]
    ROWS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_REWRITTEN_FIELD_NUMBER: _ClassVar[int]
    OLDEST_READABLE_FIELD_NUMBER: _ClassVar[int]
    keep_from: int
    rows_folded: int
    rows_dropped: int
    chunks_rewritten: int
    oldest_readable: int
    def __init__(self, keep_from: _Optional[int] = ..., rows_folded: _Optional[int] = ..., rows_dropped: _Optional[int] = ..., chunks_rewritten: _Optional[int] = ..., oldest_readable: _Optional[int] = ...) -> None: ...

class ExportVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data", "version")
    DATA_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    version: int
    def __init__(self, data: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class ImportVersionRequest(_message.Message):
    __slots__ = ("data", "expected_parent", "message", "author", "source_name")
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PARENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    expected_parent: int
    message: str
    author: str
    source_name: str
    def __init__(self, data: _Optional[bytes] = ..., expected_parent: _Optional[int] = ..., message: _Optional[str] = ..., author: _Optional[str] = ..., source_name: _Optional[str] = ...) -> None: ...
