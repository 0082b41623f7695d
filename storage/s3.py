"""The boto3 client, configured the way users configure boto3 and nothing more.

Credentials, region, profile (AWS_PROFILE) and endpoint (AWS_ENDPOINT_URL, for MinIO, R2 or a
local test server) come from boto3's own chain. Retries are botocore's: the mode and attempt
count come from AWS_RETRY_MODE / AWS_MAX_ATTEMPTS or the profile, defaulting here to
'standard' with 8 attempts, which retries throttling, 5xx and connection errors with backoff.

boto3 and botocore's session load on the first S3 call, not on import: a merge of local files
starts 0.2-0.3 s sooner (botocore's exceptions, which callers catch, are cheap to import).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import random
import threading
import time
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from storage.errors import CheckpointError, StorageError

if TYPE_CHECKING:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

_local = threading.local()


def client_config(max_pool_connections: int = 32) -> Config:
    from botocore.config import Config

    retries = {
        "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
        "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8")),
    }
    return Config(retries=retries, max_pool_connections=max_pool_connections)


@functools.cache
def _session_for(profile: str | None, endpoint: str | None, pid: int) -> boto3.Session:
    import boto3

    return boto3.Session(profile_name=profile)


def client():
    """An S3 client for this thread and process (boto3 clients are thread-safe, sessions are not)."""
    key = (os.environ.get("AWS_PROFILE"), os.environ.get("AWS_ENDPOINT_URL"), os.getpid())
    cached = getattr(_local, "clients", {})
    if key not in cached:
        session = _session_for(*key)
        cached[key] = session.client("s3", config=client_config())
        _local.clients = cached
    return cached[key]


_shared: dict[tuple, tuple[object, int]] = {}
_shared_lock = threading.Lock()


def _retries(profile: str | None) -> dict:
    """botocore's retry settings as the user set them: env, else the profile, else standard x 8."""
    import botocore.session

    try:
        scoped = botocore.session.Session(profile=profile).get_scoped_config()
    except botocore.exceptions.ProfileNotFound:
        scoped = {}
    return {
        "mode": os.environ.get("AWS_RETRY_MODE") or scoped.get("retry_mode") or "standard",
        "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or scoped.get("max_attempts") or 8),
    }


def _shared_entry() -> tuple[object, int]:
    key = (os.environ.get("AWS_PROFILE"), os.environ.get("AWS_ENDPOINT_URL"), os.getpid(),
           os.environ.get("AWS_RETRY_MODE"), os.environ.get("AWS_MAX_ATTEMPTS"), os.environ.get("AWS_CONFIG_FILE"))
    with _shared_lock:
        if key not in _shared:
            from botocore.config import Config

            retries = _retries(key[0])
            config = Config(retries=retries, max_pool_connections=64)
            _shared[key] = (_session_for(*key[:3]).client("s3", config=config), retries["total_max_attempts"])
        return _shared[key]


def shared_client():
    """One S3 client per process and configuration, shared by all threads (boto3 clients are
    thread-safe): a pool of 16 I/O threads then costs one client and one connection pool, not 16."""
    return _shared_entry()[0]


def max_attempts() -> int:
    """The attempts botocore makes; storage's own retries of broken bodies use the same number."""
    return _shared_entry()[1]


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/key' -> ('bucket', 'some/key')."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI has no bucket: {uri!r}")
    return bucket, key


# --- object operations used by storage (errors translated, bodies checked) --------------------

# Errors that are the caller's input (wrong bucket/key/permissions), never worth a retry.
_INPUT_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound", "AccessDenied", "403", "InvalidBucketName"}


def transfer_config() -> TransferConfig:
    """boto3's transfer manager settings; multipart above MERGELINE_MULTIPART_THRESHOLD_MB (default 64)."""
    from boto3.s3.transfer import TransferConfig

    mb = 1024 * 1024
    threshold = int(float(os.environ.get("MERGELINE_MULTIPART_THRESHOLD_MB", "64")) * mb)
    chunk = int(float(os.environ.get("MERGELINE_MULTIPART_CHUNK_MB", "64")) * mb)
    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=max(chunk, 5 * mb),
                          max_concurrency=int(os.environ.get("MERGELINE_IO_THREADS", "16")))


@contextlib.contextmanager
def errors_for(uri: str):
    """Turn botocore failures (already retried by botocore) into CheckpointError / StorageError."""
    try:
        yield
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _INPUT_CODES or status in (403, 404):
            raise CheckpointError(f"{uri}: {code or status} (missing or not readable)") from e
        if code == "PreconditionFailed" or status == 412:
            raise StorageError(f"{uri} changed since it was opened (ETag no longer matches); reopen it") from e
        raise StorageError(f"{uri}: {code or status} after {max_attempts()} attempts: {e}") from e
    except BotoCoreError as e:
        raise StorageError(f"{uri}: {e}") from e


def _clean_version(version: str | None) -> str | None:
    return None if version in (None, "", "null") else version


def head(bucket: str, key: str) -> tuple[int, str | None, str | None]:
    """(size, etag without quotes, version id or None) of one object."""
    uri = f"s3://{bucket}/{key}"
    with errors_for(uri):
        r = shared_client().head_object(Bucket=bucket, Key=key)
    return r["ContentLength"], (r.get("ETag") or "").strip('"') or None, _clean_version(r.get("VersionId"))


def list_dir(bucket: str, prefix: str) -> dict[str, tuple[int, str | None]]:
    """Objects directly under prefix/ (not deeper): name -> (size, etag)."""
    out: dict[str, tuple[int, str | None]] = {}
    base = prefix.rstrip("/") + "/" if prefix else ""
    with errors_for(f"s3://{bucket}/{base}"):
        for page in shared_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base, Delimiter="/"):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(base):]] = (obj["Size"], (obj.get("ETag") or "").strip('"') or None)
    return out


def list_subprefixes(bucket: str, prefix: str) -> list[str]:
    """Names of the "folders" directly under prefix/ (keys with a further '/')."""
    base = prefix.rstrip("/") + "/"
    with errors_for(f"s3://{bucket}/{base}"):
        page = shared_client().list_objects_v2(Bucket=bucket, Prefix=base, Delimiter="/", MaxKeys=10)
    return [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]


def list_keys(bucket: str, prefix: str) -> list[str]:
    """Every key under prefix/ (recursive)."""
    base = prefix.rstrip("/") + "/"
    keys: list[str] = []
    with errors_for(f"s3://{bucket}/{base}"):
        for page in shared_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


class _BodyProblem(Exception):
    pass


@functools.cache
def _body_errors() -> tuple[type[BaseException], ...]:
    """What a body that breaks off mid-stream raises, depending on where the break is noticed."""
    import urllib3.exceptions

    return _BodyProblem, BotoCoreError, OSError, urllib3.exceptions.HTTPError, http.client.HTTPException


def _fill(body, out: memoryview) -> None:
    pos = 0
    for chunk in body.iter_chunks(1 << 20):
        if pos + len(chunk) > len(out):
            raise _BodyProblem(f"body longer than the {len(out)} bytes requested")
        out[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    if pos != len(out):
        raise _BodyProblem(f"body had {pos} of {len(out)} bytes requested")


def range_part_bytes() -> int:
    return max(1, int(float(os.environ.get("MERGELINE_RANGE_PART_MB", "64")) * 1024 * 1024))


def get_range_into(bucket: str, key: str, start: int, out: memoryview, *,
                   etag: str | None = None, version_id: str | None = None) -> None:
    """Fill `out` with bytes [start, start+len(out)) of the object, or raise.

    Large ranges go as parts of MERGELINE_RANGE_PART_MB (default 64), so a failure late in a
    multi-GB tensor costs one part, not the whole tensor.
    """
    part = range_part_bytes()
    for offset in range(0, len(out), part):
        _get_part(bucket, key, start + offset, out[offset : offset + part], etag, version_id)


def _get_part(bucket: str, key: str, start: int, out: memoryview, etag: str | None, version_id: str | None) -> None:
    """botocore retries the request itself; a body that breaks off or is shorter than the range
    arrives after botocore is done, so it is retried here, never returned as data. The read is
    pinned to the version (or ETag) recorded when the file was opened."""
    n = len(out)
    uri = f"s3://{bucket}/{key}"
    kwargs = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{start + n - 1}"}
    if version_id:
        kwargs["VersionId"] = version_id
    elif etag:
        kwargs["IfMatch"] = f'"{etag}"'
    problem = ""
    for attempt in range(max_attempts()):
        if attempt:
            time.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
        with errors_for(uri):
            body = shared_client().get_object(**kwargs)["Body"]
        try:
            _fill(body, out)
            return
        except _body_errors() as e:
            problem = str(e) or type(e).__name__
        finally:
            body.close()
    raise StorageError(f"{uri} bytes {start}-{start + n - 1}: {problem} (after {max_attempts()} attempts)")


def put_bytes(bucket: str, key: str, data: bytes) -> None:
    with errors_for(f"s3://{bucket}/{key}"):
        shared_client().put_object(Bucket=bucket, Key=key, Body=data)


def upload_file(path: str, bucket: str, key: str) -> None:
    """Upload with boto3's transfer manager (multipart above the threshold; parts retried)."""
    with errors_for(f"s3://{bucket}/{key}"):
        shared_client().upload_file(path, bucket, key, Config=transfer_config())


def download_file(bucket: str, key: str, path: str) -> None:
    """Download with boto3's transfer manager (parallel ranged parts, retried)."""
    with errors_for(f"s3://{bucket}/{key}"):
        shared_client().download_file(bucket, key, path, Config=transfer_config())


def copy(src_bucket: str, src_key: str, bucket: str, key: str, *, if_match: str | None = None) -> None:
    """Server-side copy with the transfer manager (multipart copy for large objects); with
    `if_match`, only while the source still has that ETag (412 PreconditionFailed otherwise)."""
    extra = {"CopySourceIfMatch": f'"{if_match}"'} if if_match else None  # ETags are quoted on the wire
    with errors_for(f"s3://{src_bucket}/{src_key} -> s3://{bucket}/{key}"):
        shared_client().copy({"Bucket": src_bucket, "Key": src_key}, bucket, key, ExtraArgs=extra,
                             Config=transfer_config())


def delete_keys(bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i : i + 1000]]
        with errors_for(f"s3://{bucket}/{keys[i]}"):
            r = shared_client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if r.get("Errors"):
            raise StorageError(f"s3://{bucket}: could not delete {r['Errors'][:3]}")


def abort_uploads(bucket: str, prefix: str) -> None:
    """Abort multipart uploads left under prefix/ by a killed writer (they cost storage, invisibly)."""
    base = prefix.rstrip("/") + "/"
    with errors_for(f"s3://{bucket}/{base}"):
        for page in shared_client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=base):
            for up in page.get("Uploads", []):
                shared_client().abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
