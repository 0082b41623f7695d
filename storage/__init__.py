"""storage: bytes in and out of checkpoints (local paths or s3://), nothing about merging.

Read: open_checkpoint (headers only, validated) -> Checkpoint.read_tensor / read_many.
Write: ShardWriter into staging_uri(output) -> publish_checkpoint (atomic, marker last).
See docs/storage.md.
"""

from storage.cache import CacheStats, ReadCache
from storage.errors import CheckpointError, StorageError
from storage.headers import DTYPES, MAX_HEADER_BYTES, TensorInfo
from storage.reader import (
    COMPLETE_MARKER,
    INDEX_NAME,
    SIDECAR_NAME,
    Checkpoint,
    check_compatible,
    is_complete,
    local_copy,
    open_checkpoint,
    read_many,
)
from storage.uri import FileIdentity, safe_component, validate_output_uri
from storage.writer import (
    ShardInfo,
    ShardWriter,
    abort_staging,
    publish_checkpoint,
    staged_shard,
    staging_uri,
)

__all__ = [
    "COMPLETE_MARKER", "DTYPES", "INDEX_NAME", "MAX_HEADER_BYTES", "SIDECAR_NAME",
    "CacheStats", "Checkpoint", "CheckpointError", "FileIdentity", "ReadCache", "ShardInfo", "ShardWriter",
    "StorageError", "TensorInfo", "abort_staging", "check_compatible", "is_complete", "local_copy", "open_checkpoint",
    "publish_checkpoint", "read_many", "safe_component", "staged_shard", "staging_uri", "validate_output_uri",
]
