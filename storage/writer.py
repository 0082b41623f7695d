"""Write a merged checkpoint: streamed safetensors shards into staging, then an atomic publish.

Layout while writing (S3 and local alike):

    <parent>/.mergeline-staging/<name>/   shards, then config/tokenizer files, mergeline.json,
                                          model.safetensors.index.json and the marker
    <parent>/<name>/                      the published checkpoint; complete iff it holds
                                          COMPLETE_MARKER (written last)

Locally the staging directory is renamed into place (one atomic step). S3 has no rename, so the
objects are copied: the old marker is deleted first and mergeline.json copied first (a reader
then sees an incomplete mergeline output, never a plausible-looking mix), the marker last.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from storage import s3
from storage.errors import CheckpointError, StorageError
from storage.headers import CODES, build_header
from storage.reader import (
    COMPLETE_MARKER,
    CONFIG_NAME,
    INDEX_NAME,
    SIDECAR_NAME,
    SINGLE_NAME,
    Checkpoint,
    io_pool,
    io_threads,
    open_checkpoint,
    read_header,
    read_small,
)
from storage.uri import (
    check_filename,
    copy_file,
    delete,
    delete_tree,
    is_s3,
    join,
    list_dir,
    list_subdirs,
    normalize,
    put_bytes,
    split_parent,
    stat,
    validate_output_uri,
    with_missing_ok,
)
from storage.version import code_version

STAGING_DIR = ".mergeline-staging"
FORMAT = "mergeline/1"
_SHARD_INFO_SUFFIX = ".shard.json"


def staging_uri(output_uri: str) -> str:
    """Where a checkpoint is staged: a sibling hidden folder, so the same filesystem (rename) and the
    same per-output name every time (a restarted merge finds its finished shards again)."""
    parent, name = split_parent(validate_output_uri(output_uri))
    return join(join(parent, STAGING_DIR), name)


def _spool_prefix(staging: str) -> str:
    return f"mergeline-spool-{hashlib.sha256(staging.encode()).hexdigest()[:16]}-"


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: once, at import, not from threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _spool_dir() -> str:
    return os.environ.get("MERGELINE_SPOOL_DIR") or tempfile.gettempdir()


@dataclass(frozen=True)
class ShardInfo:
    filename: str
    uri: str
    size: int
    sha256: str
    tensors: tuple[str, ...]
    # The staged object's identity (S3 ETag, local mtime/ctime/inode) once written: publish refuses
    # a shard that another writer replaced since, e.g. a stalled run that lost the output's lock.
    etag: str | None = None


class ShardWriter:
    """Stream one shard: the header (offsets known from the specs) first, then each tensor, whole or
    as consecutive blocks of rows, so no layer is ever held in memory at once.

    The shard appears at its staging URI only on a clean exit (local: temp file + rename; S3: a
    local spool file, then boto3's upload_file, multipart when large). On an exception, or if a
    tensor was not written, nothing is left at the shard's name.
    """

    def __init__(self, staging: str, filename: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.staging = validate_output_uri(staging)
        self.filename = check_filename(filename, self.staging)
        if not filename.endswith(".safetensors"):
            raise ValueError(f"shard name {filename!r} must end in .safetensors")
        self.specs = [(name, dtype, tuple(int(d) for d in shape)) for name, dtype, shape in specs]
        names = [name for name, _, _ in self.specs]
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{filename}: tensor names must be unique, non-empty strings")
        for name, dtype, shape in self.specs:
            if dtype not in CODES:
                raise ValueError(f"{filename}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            if any(d < 0 for d in shape):
                raise ValueError(f"{filename}: tensor {name!r} has negative shape {shape}")
        metadata = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"{filename}: safetensors metadata must map strings to strings")
        self._header, self._sizes = build_header(self.specs, metadata)
        self.uri = join(self.staging, filename)
        self.result: ShardInfo | None = None
        self._file = None

    def __enter__(self) -> ShardWriter:
        delete(self.uri)  # a stale shard from an earlier attempt must not survive a failed one
        delete(self.uri + _SHARD_INFO_SUFFIX)
        if is_s3(self.staging):
            fd, self._tmp = tempfile.mkstemp(prefix=_spool_prefix(self.staging), suffix=".safetensors",
                                             dir=_spool_dir())
        else:
            os.makedirs(self.staging, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=f".{self.filename}.", suffix=".tmp", dir=self.staging)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make the published shards private
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._next, self._rows = 0, 0
        self._emit(self._header)
        return self

    def _emit(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor in spec order: all of it, or its next block of rows."""
        if self._file is None:
            raise ValueError("ShardWriter.write outside its `with` block")
        if self._next >= len(self.specs):
            raise ValueError(f"{self.filename}: {name!r} written after all tensors were written")
        want, dtype, shape = self.specs[self._next]
        if name != want:
            raise ValueError(f"{self.filename}: expected {want!r} next, got {name!r}")
        if tensor.dtype != dtype:
            raise ValueError(f"{self.filename}: {name!r} should be {dtype}, got {tensor.dtype}")
        n_rows = shape[0] if shape else 1
        got = tuple(tensor.shape)
        if got == shape and self._rows == 0:
            take = n_rows
        elif shape and len(got) == len(shape) and got[1:] == shape[1:] and self._rows + got[0] <= n_rows:
            take = got[0]
        else:
            raise ValueError(f"{self.filename}: {name!r} has shape {shape}; got {got} after {self._rows} rows")
        data = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
        self._emit(data.reshape(-1).view(torch.uint8).numpy())
        self._rows += take
        if self._rows == n_rows:
            self._next, self._rows = self._next + 1, 0

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self._file = self._file, None
        try:
            if exc_type is not None:
                return
            if self._next < len(self.specs):
                raise ValueError(f"{self.filename}: {self.specs[self._next][0]!r} and later tensors were not written")
            f.flush()
            os.fsync(f.fileno())
            f.close()
            size = os.path.getsize(self._tmp)
            if size != len(self._header) + sum(self._sizes):
                raise StorageError(f"{self._tmp}: wrote {size} bytes, expected {len(self._header) + sum(self._sizes)}")
            result = ShardInfo(self.filename, self.uri, size, self._hash.hexdigest(),
                               tuple(name for name, _, _ in self.specs))
            if is_s3(self.uri):
                s3.upload_file(self._tmp, *s3.split_s3_uri(self.uri))
            else:
                os.replace(self._tmp, self.uri)
            self.result = _record_staged(result)
        finally:
            f.close()
            with_missing_ok(os.remove, self._tmp)


def _record_staged(info: ShardInfo) -> ShardInfo:
    """Write the record staged_shard finds after a restart, with the staged object's identity;
    without a record, nothing is left at the shard's name."""
    try:
        info = dataclasses.replace(info, etag=stat(info.uri).etag)
        put_bytes(info.uri + _SHARD_INFO_SUFFIX, json.dumps(dataclasses.asdict(info)).encode())
    except BaseException:
        delete(info.uri)
        raise
    return info


def restage_shard(source_uri: str, info: ShardInfo) -> ShardInfo:
    """Copy a published shard back into staging at info.uri (a cached unit of a re-run), recorded
    as if written there, so a run killed while publishing resumes from it."""
    delete(info.uri + _SHARD_INFO_SUFFIX)
    copy_file(source_uri, info.uri)
    return _record_staged(info)


def staged_shard(staging: str, filename: str) -> ShardInfo | None:
    """The ShardInfo of a shard an earlier (killed) attempt finished in staging, if it is intact:
    still the object its record describes."""
    uri = join(validate_output_uri(staging), check_filename(filename, staging))
    try:
        info = json.loads(read_small(stat(uri + _SHARD_INFO_SUFFIX), None))
        ident = stat(uri)
        if ident.size != info["size"] or ident.etag != info.get("etag", ident.etag):
            return None
    except (CheckpointError, ValueError, KeyError):
        return None
    return ShardInfo(info["filename"], info["uri"], info["size"], info["sha256"], tuple(info["tensors"]),
                     info.get("etag"))


def abort_staging(staging: str) -> None:
    """Remove a staging area and anything a killed writer left for it (spool files, multipart uploads)."""
    staging = validate_output_uri(staging)
    delete_tree(staging)
    if not is_s3(staging):
        _remove_if_empty(os.path.dirname(staging))
    _remove_spool(staging)


def _remove_spool(staging: str) -> None:
    """Spool files (a whole shard each) that killed S3 writers for this staging area left behind."""
    for path in glob.glob(os.path.join(_spool_dir(), _spool_prefix(staging) + "*")):
        with_missing_ok(os.remove, path)


def _json_default(obj):
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path | torch.dtype):
        return str(obj)
    if isinstance(obj, set | frozenset | tuple):
        return sorted(obj) if isinstance(obj, set | frozenset) else list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable in the provenance sidecar")


def _to_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def _check_shards(staging: str, shards: list[ShardInfo]) -> tuple[dict[str, str], int]:
    """Re-read each staged shard's header: the index is built from what is really there."""
    if not shards:
        raise CheckpointError(f"{staging}: no shards to publish")
    files = [s.filename for s in shards]
    if len(set(files)) != len(files):
        raise CheckpointError(f"{staging}: duplicate shard names {files}")
    if SINGLE_NAME in files and len(files) > 1:
        raise CheckpointError(f"{staging}: {SINGLE_NAME!r} would hide the other shards from readers")

    def check(shard: ShardInfo):
        check_filename(shard.filename, staging)
        if shard.uri != join(staging, shard.filename):
            raise CheckpointError(f"{shard.uri}: shard is not in staging area {staging}")
        ident = stat(shard.uri)
        if ident.size != shard.size:
            raise CheckpointError(f"{shard.uri}: {ident.size} bytes in staging, {shard.size} when written")
        if shard.etag is not None and ident.etag != shard.etag:
            raise CheckpointError(f"{shard.uri}: replaced in staging since this run wrote it (by another merge "
                                  "of this output that lost its lock?); nothing was published, run the merge again")
        infos = read_header(ident, shard.filename, None)
        if sorted(t.name for t in infos) != sorted(shard.tensors):
            raise CheckpointError(f"{shard.uri}: header tensors differ from the ShardInfo")
        return infos

    weight_map: dict[str, str] = {}
    total = 0
    for shard, infos in zip(shards, io_pool(io_threads()).map(check, shards), strict=True):
        for t in infos:
            if t.name in weight_map:
                raise CheckpointError(f"{staging}: tensor {t.name!r} is in both {weight_map[t.name]} and {shard.filename}")
            weight_map[t.name] = shard.filename
            total += t.nbytes
    return dict(sorted(weight_map.items())), total


def check_output(output_uri: str, inputs: Iterable[str] = ()) -> str:
    """The output URI, normalised, if publishing there can replace nothing but an earlier mergeline
    output: not an input, inside one or holding one; not a file; no folders inside; no files
    without mergeline.json.
    The plan calls this before any work; publish again, just before it replaces anything."""
    out = validate_output_uri(output_uri)
    real = out if is_s3(out) else os.path.realpath(out)  # a symlink names the folder it points to
    for uri in map(normalize, inputs):
        where = uri if is_s3(uri) else os.path.realpath(uri)
        if where == real or where.startswith(real + "/") or real.startswith(where + "/"):
            what = "is" if where == real else "holds" if where.startswith(real + "/") else "is inside"
            raise CheckpointError(f"output {out} {what} an input of this merge ({uri}); choose another output")
    if not is_s3(out) and os.path.lexists(out) and not os.path.isdir(out):
        raise CheckpointError(f"output {out} is a file, not a folder; refusing to replace it")
    folders = list_subdirs(out)
    if folders:
        raise CheckpointError(f"output {out} holds folders ({', '.join(sorted(folders)[:3])}), so it is not "
                              "a model mergeline wrote; refusing to replace it")
    existing = list_dir(out)
    if existing and SIDECAR_NAME not in existing:
        raise CheckpointError(f"{out} holds files that mergeline did not write; refusing to replace them")
    return out


def publish_checkpoint(output_uri: str, staging: str, shards: list[ShardInfo], *, config_source: Checkpoint,
                       dtype: torch.dtype, sidecar: dict) -> Checkpoint:
    """Complete the staged checkpoint and make it visible at output_uri in one step (see module doc)."""
    out = check_output(output_uri)
    staging = validate_output_uri(staging)
    if staging == out or staging.startswith(out + "/"):
        raise CheckpointError(f"staging {staging} must be outside the output {out}")
    existing = list_dir(out)
    weight_map, total = _check_shards(staging, shards)
    dtype_name = str(dtype).removeprefix("torch.")
    config = {**config_source.config, "torch_dtype": dtype_name, "dtype": dtype_name}
    now = datetime.now(UTC).isoformat()
    provenance = {
        "format": FORMAT, **sidecar,
        "code_version": sidecar.get("code_version") or code_version(),
        "published_at": now, "dtype": dtype_name,
        "config_source": {"uri": config_source.uri, "identity": config_source.identity},
        "shards": [{"filename": s.filename, "size": s.size, "sha256": s.sha256, "tensors": len(s.tensors)}
                   for s in shards],
    }
    small = {SIDECAR_NAME: _to_json(provenance)}
    small |= {n: config_source.read_bytes(n) for n in config_source.extra_files if n != CONFIG_NAME}
    small[CONFIG_NAME] = _to_json(config)
    small[INDEX_NAME] = _to_json({"metadata": {"total_size": total}, "weight_map": weight_map})  # last
    for name, data in small.items():
        put_bytes(join(staging, name), data)
    sizes = {s.filename: s.size for s in shards} | {n: len(d) for n, d in small.items()}
    marker = _to_json({"format": FORMAT, "published_at": now, "files": sizes})
    if is_s3(out):
        _publish_s3(out, staging, {s.filename: s.etag for s in shards}, list(small), existing, marker)
    else:
        _publish_local(out, staging, set(sizes), marker)
    return open_checkpoint(out)


def _publish_local(out: str, staging: str, names: set[str], marker: bytes) -> None:
    put_bytes(join(staging, COMPLETE_MARKER), marker)
    for entry in os.scandir(staging):  # temp files and shard infos of earlier attempts
        if entry.name not in names | {COMPLETE_MARKER}:
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.remove(entry.path)
    fd = os.open(staging, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    old = staging + ".replaced"
    shutil.rmtree(old, ignore_errors=True)
    try:
        if os.path.lexists(out) and _exchange(staging, out):
            os.rename(staging, old)  # the old model, now at the staging path
        else:  # no atomic swap here: for a moment there is no model at `out` (restore_replaced)
            if os.path.lexists(out):
                os.rename(out, old)
            os.rename(staging, out)
    except OSError as e:
        raise StorageError(f"could not move {staging} into place at {out}: {e}") from e
    shutil.rmtree(old, ignore_errors=True)
    _remove_if_empty(os.path.dirname(staging))


def restore_replaced(output_uri: str) -> bool:
    """Put back the model a killed local publish had moved aside (where no atomic swap exists,
    publish renames the old model away, then the new one in); True if it did. Call holding the
    output's lock."""
    out = validate_output_uri(output_uri)
    old = staging_uri(out) + ".replaced"
    if is_s3(out) or os.path.lexists(out) or not os.path.isdir(old):
        return False
    os.rename(old, out)
    return True


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # Linux, glibc 2.28+
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE), so readers of `b` always find a
    complete model; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")


def _remove_if_empty(directory: str) -> None:
    """Drop the shared .mergeline-staging folder once no other output is staged in it."""
    try:
        os.rmdir(directory)
    except OSError:
        pass


def _publish_s3(out: str, staging: str, shard_etags: dict[str, str | None], small_names: list[str],
                existing: dict[str, int], marker: bytes) -> None:
    """Each shard is copied only if it is still the object this run wrote (CopySourceIfMatch):
    checked once in _check_shards, and again here, atomically, by S3."""
    bucket, key = s3.split_s3_uri(out)
    sbucket, skey = s3.split_s3_uri(staging)
    shard_names = list(shard_etags)

    def copy(name: str) -> None:
        s3.copy(sbucket, f"{skey}/{name}", bucket, f"{key}/{name}", if_match=shard_etags.get(name))

    if COMPLETE_MARKER in existing:
        s3.delete_keys(bucket, [f"{key}/{COMPLETE_MARKER}"])
    copy(SIDECAR_NAME)  # first: from here on a reader sees "incomplete mergeline output"
    list(io_pool(io_threads()).map(copy, shard_names))
    for name in small_names:
        if name not in (SIDECAR_NAME, INDEX_NAME):
            copy(name)
    keep = set(shard_names) | set(small_names)
    stale = [f"{key}/{n}" for n in existing if n not in keep and n != COMPLETE_MARKER]
    if stale:
        s3.delete_keys(bucket, stale)
    copy(INDEX_NAME)
    s3.put_bytes(bucket, f"{key}/{COMPLETE_MARKER}", marker)
    delete_tree(staging)
    _remove_spool(staging)
