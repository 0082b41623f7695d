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


@pytest.fixture(scope="session")
def _s3_fault_proxy(s3_server):
    """One proxy server per session (a stable endpoint lets boto3 clients be reused across tests)."""
    from s3_faults import FaultProxy

    proxy = FaultProxy(s3_server).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_faults(s3_env, _s3_fault_proxy, monkeypatch, request):
    """A fault-injecting HTTP proxy (tests/s3_faults.py) between boto3 and the test S3 endpoint.

    AWS_ENDPOINT_URL points at the proxy for the test. Default: 20% of requests fail (500, 503,
    connection reset, truncated or short bodies), seed 0. Parametrise with indirect=True and a
    fraction or a dict of FaultProxy.reset arguments, or call .configure() / use .paused() in the test.
    """
    param = getattr(request, "param", None)
    kwargs = {"fraction": 0.2, **(param if isinstance(param, dict) else {} if param is None else {"fraction": param})}
    _s3_fault_proxy.reset(**kwargs)
    monkeypatch.setenv("AWS_ENDPOINT_URL", _s3_fault_proxy.endpoint)
    try:
        yield _s3_fault_proxy
    finally:
        _s3_fault_proxy.reset()


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory):
    """Tiny Llama checkpoints (hidden 32, 2 layers) in HF layout, made once per session.

    'single': model.safetensors (bf16) + tokenizer/generation files; 'sharded': the same model in
    fp32 as index + shards; 'expert': another seed, same shapes (bf16); 'other': 1 layer, hidden 16.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(path, seed, dtype, hidden=32, layers=2, shard=None):
        cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False)
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
        (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
        (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')
        return path

    root = tmp_path_factory.mktemp("tiny-llamas")
    return {
        "single": make(root / "single", 0, torch.bfloat16),
        "sharded": make(root / "sharded", 0, torch.float32, shard="30KB"),
        "expert": make(root / "expert", 1, torch.bfloat16),
        "other": make(root / "other", 2, torch.bfloat16, hidden=16, layers=1),
    }


@pytest.fixture
def put_s3_dir(s3_server):
    """put_s3_dir(local_dir, bucket, prefix) -> 's3://bucket/prefix': uploads straight to the test
    endpoint with plain boto3 (never through a fault proxy), for test setup."""

    client = _raw_s3_client(s3_server)

    def put(local, bucket_name: str, prefix: str) -> str:
        for f in sorted(p for p in local.iterdir() if p.is_file()):
            client.upload_file(str(f), bucket_name, f"{prefix}/{f.name}")
        return f"s3://{bucket_name}/{prefix}"

    return put


_RAW_S3_CLIENTS: dict = {}


def _raw_s3_client(endpoint: str):
    if endpoint not in _RAW_S3_CLIENTS:
        _RAW_S3_CLIENTS[endpoint] = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                                 aws_access_key_id="testing", aws_secret_access_key="testing")
    return _RAW_S3_CLIENTS[endpoint]
