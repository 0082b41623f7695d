"""Shared fixtures: a real S3-compatible endpoint over HTTP on 127.0.0.1 (moto's server)."""

from __future__ import annotations

import socket
import uuid

import boto3
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's ThreadedMotoServer once per test session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point plain boto3 configuration at the test endpoint, as a user would with MinIO."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def bucket(s3_env):
    """A fresh, empty bucket on the test endpoint; yields its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real Prefect API server (temporary database) for the session; results persisted to a temp dir."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage_path = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=120), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage_path}):
        yield


@pytest.fixture
def s3_faults(s3_env, s3_server, monkeypatch, request):
    """A fault-injecting HTTP proxy (tests/s3_faults.py) between boto3 and the test S3 endpoint.

    AWS_ENDPOINT_URL points at the proxy for the test. Default: 20% of requests fail (500, 503,
    connection reset, truncated or short bodies), seed 0. Parametrise with indirect=True and a
    fraction or a dict of FaultProxy arguments, or call .configure() / use .paused() in the test.
    """
    from s3_faults import FaultProxy

    param = getattr(request, "param", None)
    kwargs = {"fraction": 0.2, **(param if isinstance(param, dict) else {} if param is None else {"fraction": param})}
    proxy = FaultProxy(s3_server, **kwargs).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        yield proxy
    finally:
        proxy.stop()
