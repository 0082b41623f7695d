"""The boto3 client, configured the way users configure boto3 and nothing more.

Credentials, region, profile (AWS_PROFILE) and endpoint (AWS_ENDPOINT_URL, for MinIO, R2 or a
local test server) come from boto3's own chain. Retries are botocore's: the mode and attempt
count come from AWS_RETRY_MODE / AWS_MAX_ATTEMPTS or the profile, defaulting here to
'standard' with 8 attempts, which retries throttling, 5xx and connection errors with backoff.
"""

from __future__ import annotations

import functools
import os
import threading

import boto3
from botocore.config import Config

_local = threading.local()


def client_config(max_pool_connections: int = 32) -> Config:
    retries = {
        "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
        "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8")),
    }
    return Config(retries=retries, max_pool_connections=max_pool_connections)


@functools.cache
def _session_for(profile: str | None, endpoint: str | None, pid: int) -> boto3.Session:
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


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/key' -> ('bucket', 'some/key')."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI has no bucket: {uri!r}")
    return bucket, key
