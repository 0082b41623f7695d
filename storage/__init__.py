"""storage: bytes in and out of checkpoints (local paths or s3://), nothing about merging.

Read: open_checkpoint (headers only, validated) -> Checkpoint.read_tensor / read_many.
Write: ShardWriter into staging_uri(output) -> publish_checkpoint (atomic, marker last).
See docs/storage.md.
"""

from importlib import import_module

# Names resolve on first use (PEP 562), so `import storage.catalog` or the CLI's error handling
# does not pay for torch: `mergeline catalog ...` starts in about a second instead of three.
_HOME = {
    "storage.cache": ("CacheStats", "ReadCache"),
    "storage.errors": ("CheckpointError", "StorageError"),
    "storage.headers": ("DTYPES", "MAX_HEADER_BYTES", "TensorInfo"),
    "storage.reader": ("COMPLETE_MARKER", "INDEX_NAME", "SIDECAR_NAME", "Checkpoint", "check_compatible",
                       "is_complete", "local_copy", "open_checkpoint", "read_many"),
    "storage.uri": ("FileIdentity", "safe_component", "validate_output_uri"),
    "storage.writer": ("ShardInfo", "ShardWriter", "abort_staging", "publish_checkpoint", "staged_shard",
                       "staging_uri"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "COMPLETE_MARKER", "DTYPES", "INDEX_NAME", "MAX_HEADER_BYTES", "SIDECAR_NAME",
    "CacheStats", "Checkpoint", "CheckpointError", "FileIdentity", "ReadCache", "ShardInfo", "ShardWriter",
    "StorageError", "TensorInfo", "abort_staging", "check_compatible", "is_complete", "local_copy", "open_checkpoint",
    "publish_checkpoint", "read_many", "safe_component", "staged_shard", "staging_uri", "validate_output_uri",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
