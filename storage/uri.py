"""URIs (local paths or s3://bucket/prefix) and the few file operations storage needs on both.

Everything above this module speaks URIs; only here (and in s3.py) do local and S3 differ.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import sys
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from storage import s3
from storage.errors import CheckpointError, StorageError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_FILENAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class FileIdentity:
    """What a file is, for cache keys and lineage: same identity means same bytes.

    Local files have no ETag; theirs is made of the inode's mtime, ctime and number (_local_etag),
    so a rewritten file gets a new identity even when its mtime is put back (cp -p, rsync -a, tar).
    """

    uri: str
    size: int
    etag: str | None
    version_id: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _reject_controls(uri: str) -> None:
    if not uri or any(ord(c) < 32 for c in uri) or "\\" in uri:
        raise CheckpointError(f"invalid URI {uri!r}: empty, control characters or backslashes")


def normalize(uri: str) -> str:
    """An input URI in canonical form: s3://bucket/key without trailing slash, or an absolute path."""
    uri = str(uri).strip()
    _reject_controls(uri)
    if is_s3(uri):
        bucket, key = s3.split_s3_uri(uri)
        return f"s3://{bucket}/{key.strip('/')}".rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise CheckpointError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(uri))


def validate_output_uri(uri: str) -> str:
    """Normalised output URI; refuses '..'/'.' segments, empty segments and bucket/filesystem roots."""
    raw = str(uri).strip()
    _reject_controls(raw)
    if is_s3(raw):
        bucket, key = s3.split_s3_uri(raw)
        if not _BUCKET.match(bucket):
            raise CheckpointError(f"output URI {uri!r}: invalid bucket name {bucket!r}")
        parts = key.rstrip("/").split("/")
        if not key.strip("/") or any(p in ("", ".", "..") for p in parts):
            raise CheckpointError(f"output URI {uri!r} must name a prefix without '.', '..' or empty segments")
        return f"s3://{bucket}/{'/'.join(parts)}"
    path = raw[len("file://"):] if raw.startswith("file://") else raw
    if "://" in path:
        raise CheckpointError(f"unsupported URI scheme in output {uri!r}")
    if ".." in Path(path).parts:
        raise CheckpointError(f"output URI {uri!r} contains '..'; refusing a path that escapes its prefix")
    path = os.path.abspath(os.path.expanduser(path))
    if Path(path).parent == Path(path):
        raise CheckpointError(f"output URI {uri!r} is a filesystem root")
    return path


def check_filename(name: str, where: str = "") -> str:
    """A plain file name (no separators, no leading dot, no '..'): names from files never become paths."""
    if not isinstance(name, str) or not _FILENAME.match(name) or ".." in name:
        raise CheckpointError(f"{where}: refusing file name {name!r} (must be a plain name like 'model-00001.safetensors')")
    return name


def safe_component(name: str) -> str:
    """Escape any name (a model name, a tensor name) into one safe path component, reversibly."""
    if not name:
        raise CheckpointError("empty name cannot become a path component")
    out = urllib.parse.quote(name, safe="")  # reversible with urllib.parse.unquote
    return "%2E" + out[1:] if out.startswith(".") else out  # no hidden files, no '.' or '..'


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_s3(base) else os.path.join(base, name)


def split_parent(uri: str) -> tuple[str, str]:
    """('parent URI', 'last component')."""
    if is_s3(uri):
        bucket, key = s3.split_s3_uri(uri)
        head, _, name = key.rpartition("/")
        return (f"s3://{bucket}/{head}" if head else f"s3://{bucket}"), name
    return os.path.dirname(uri), os.path.basename(uri)


def _key(uri: str) -> tuple[str, str]:
    return s3.split_s3_uri(uri)


# --- operations -------------------------------------------------------------------------------


def stat(uri: str) -> FileIdentity:
    if is_s3(uri):
        size, etag, version = s3.head(*_key(uri))
        return FileIdentity(uri, size, etag, version)
    try:
        st = os.stat(uri)
    except FileNotFoundError as e:
        raise CheckpointError(f"{uri}: no such file") from e
    return FileIdentity(uri, st.st_size, _local_etag(st), None)


def _local_etag(st: os.stat_result) -> str:
    """mtime can be set back by anyone (os.utime); ctime cannot, and every write moves it, as a
    file replaced by rename gets a new inode. (A chmod or a new hard link moves ctime too: such a
    file counts as changed, and is merged again, never the other way round.)"""
    return f"mtime-{st.st_mtime_ns}-ctime-{st.st_ctime_ns}-ino-{st.st_ino}"


def list_dir(uri: str) -> dict[str, int]:
    """Files directly inside a directory/prefix: name -> size ({} when there is none)."""
    if is_s3(uri):
        return {name: size for name, (size, _) in s3.list_dir(*_key(uri)).items()}
    try:
        with os.scandir(uri) as it:
            return {e.name: e.stat().st_size for e in it if e.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def list_subdirs(uri: str) -> list[str]:
    """Some of the folders (S3: common prefixes) directly inside a directory/prefix; [] when none."""
    if is_s3(uri):
        return s3.list_subprefixes(*_key(uri))
    try:
        with os.scandir(uri) as it:
            return [e.name for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def listing_identities(uri: str) -> dict[str, FileIdentity]:
    """Like list_dir but with identities (from one LIST on S3: size + ETag, no version)."""
    if is_s3(uri):
        return {n: FileIdentity(join(uri, n), size, etag, None) for n, (size, etag) in s3.list_dir(*_key(uri)).items()}
    return {n: stat(join(uri, n)) for n in list_dir(uri)}


def read_into(ident: FileIdentity, start: int, out: memoryview) -> None:
    """Fill out with bytes [start, start+len(out)) of the file, checking it is still the same file."""
    if is_s3(ident.uri):
        bucket, key = _key(ident.uri)
        s3.get_range_into(bucket, key, start, out, etag=ident.etag, version_id=ident.version_id)
        return
    with open(ident.uri, "rb") as f:
        _check_unchanged(ident, f)
        f.seek(start)
        got = f.readinto(out)
    if got != len(out):
        raise CheckpointError(f"{ident.uri}: file shorter than expected ({start + got} < {start + len(out)} bytes)")


def map_range(ident: FileIdentity, start: int, end: int) -> tuple[mmap.mmap, int]:
    """Bytes [start, end) of a local file mapped into memory: (the mapping, where they start in it).

    No copy and no fresh pages: the range is the page cache's own pages, read from disk now if
    they are not there (MADV_POPULATE_READ, Linux 5.14+; elsewhere they fault in on first touch).
    Copy-on-write, so writing to it never reaches the file. The mapping lasts as long as anything
    refers to it. As with every memory map (safetensors' own loader too), truncating the file
    while it is mapped kills the process (SIGBUS): the file's identity is checked here, as reads
    check it.
    """
    with open(ident.uri, "rb") as f:
        size = _check_unchanged(ident, f)
        if end > size:
            raise CheckpointError(f"{ident.uri}: file shorter than expected ({size} < {end} bytes)")
        first = start - start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(f.fileno(), end - first, offset=first, access=mmap.ACCESS_COPY)
    if _MADV_POPULATE_READ is not None:
        try:
            mapped.madvise(_MADV_POPULATE_READ)
        except OSError:  # a kernel before 5.14: the pages fault in as they are first touched
            pass
    return mapped, start - first


# Linux's value (Python 3.11 does not name it); on other systems 22 may mean something else
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def _check_unchanged(ident: FileIdentity, f) -> int:
    """The open file's size, if it is still the file `ident` describes."""
    st = os.fstat(f.fileno())
    if st.st_size != ident.size or _local_etag(st) != ident.etag:
        raise CheckpointError(f"{ident.uri} changed since it was opened; reopen the checkpoint")
    return st.st_size


def exists(uri: str) -> bool:
    if is_s3(uri):
        try:
            s3.head(*_key(uri))
            return True
        except CheckpointError:
            return False
    return os.path.isfile(uri)


def put_bytes(uri: str, data: bytes) -> None:
    """Write a small file; local writes go through a temp file + rename so readers never see half."""
    if is_s3(uri):
        s3.put_bytes(*_key(uri), data)
        return
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    tmp = f"{uri}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, uri)


def delete(uri: str) -> None:
    if is_s3(uri):
        s3.delete_keys(_key(uri)[0], [_key(uri)[1]])
    else:
        with_missing_ok(os.remove, uri)


def delete_tree(uri: str) -> None:
    """Remove a directory/prefix and everything under it (and, on S3, unfinished multipart uploads)."""
    if is_s3(uri):
        bucket, key = _key(uri)
        s3.abort_uploads(bucket, key)
        s3.delete_keys(bucket, s3.list_keys(bucket, key))
    else:
        shutil.rmtree(uri, ignore_errors=True)


def with_missing_ok(fn, *args) -> None:
    try:
        fn(*args)
    except FileNotFoundError:
        pass


def copy_file(src: str, dst: str) -> None:
    """Copy one file: server-side on S3 (no bytes through this machine), temp + rename locally."""
    if is_s3(src) and is_s3(dst):
        s3.copy(*_key(src), *_key(dst))
        return
    if is_s3(src) or is_s3(dst):
        raise StorageError(f"copy between S3 and local paths is not supported: {src} -> {dst}")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
