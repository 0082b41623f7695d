"""The two failures storage raises, split by what a caller should do about them."""

from __future__ import annotations


class CheckpointError(ValueError):
    """Bad input (malformed file, missing tensor, refused URI): retrying cannot help.

    The message always names the file, tensor or URI at fault.
    """


class StorageError(RuntimeError):
    """An I/O failure that survived the retries (5xx, resets, short bodies): a later retry may succeed."""
