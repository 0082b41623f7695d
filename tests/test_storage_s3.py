"""Reading checkpoints from S3 over real HTTP (moto's server), through the fault-injecting proxy."""

from __future__ import annotations

import time

import boto3
import pytest
import torch
from safetensors.torch import load_file, save_file

import storage
from storage import CheckpointError, StorageError, open_checkpoint, read_many

NO_FAULTS = {"fraction": 0.0}


def all_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


def assert_all_equal(ck, want):
    assert set(ck.tensors) == set(want)
    got = read_many([(ck, n) for n in want])
    for g, (name, w) in zip(got, want.items(), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g.view(torch.uint8), w.view(torch.uint8)), name


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_headers_come_from_ranged_gets_only(tiny_llamas, bucket, put_s3_dir, s3_faults, kind):
    local = tiny_llamas[kind]
    uri = put_s3_dir(local, bucket, f"models/{kind}")
    ck = open_checkpoint(uri)
    assert ck.uri == uri and ck.model_type == "llama"
    assert set(ck.files) == {f.name for f in local.glob("*.safetensors")}
    for name, ident in ck.files.items():
        assert ident.uri == f"{uri}/{name}" and ident.size == (local / name).stat().st_size and ident.etag
        assert ident.version_id is None  # bucket without versioning
        gets = s3_faults.requests("GET", key_contains=f"/{name}")
        header_len = int.from_bytes((local / name).read_bytes()[:8], "little")
        assert [g.range for g in gets] == ["bytes=0-7", f"bytes=8-{8 + header_len - 1}"]
    assert_all_equal(ck, all_tensors(local))
    for g in s3_faults.requests("GET", key_contains=".safetensors"):
        assert g.range and g.range.startswith("bytes=")  # never a whole weight file
    assert ck.read_bytes("tokenizer.json") == (local / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("s3_faults", [{"fraction": 0.3, "seed": 7}], indirect=True)
def test_faults_are_retried_to_exact_bytes(tiny_llamas, bucket, put_s3_dir, s3_faults, monkeypatch):
    monkeypatch.setenv("MERGELINE_IO_THREADS", "8")
    for kind in ("single", "sharded"):
        uri = put_s3_dir(tiny_llamas[kind], bucket, f"models/{kind}")
        ck = open_checkpoint(uri)
        want = all_tensors(tiny_llamas[kind])
        assert_all_equal(ck, want)
        assert ck.read_tensor("model.embed_tokens.weight", rows=(3, 77)).equal(want["model.embed_tokens.weight"][3:77])
    # every kind of fault happened, and often
    faults = s3_faults.faults()
    assert set(faults) == {"500", "503", "reset", "truncate", "short"}, faults
    assert s3_faults.injected >= 20


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_short_bodies_are_never_returned_as_data(tiny_llamas, bucket, put_s3_dir, s3_faults, monkeypatch):
    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    ck = open_checkpoint(uri)
    want = load_file(tiny_llamas["single"] / "model.safetensors")["lm_head.weight"]
    # every ranged GET answers half the bytes, with a matching Content-Length, twice, then the truth
    s3_faults.configure(fraction=1.0, kinds=("short",), max_faults_per_request=2)
    assert torch.equal(ck.read_tensor("lm_head.weight"), want)
    assert s3_faults.faults()["short"] == 2
    # ... and if it never stops, the read fails instead of returning short data
    s3_faults.configure(max_faults_per_request=1000)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    with pytest.raises(StorageError, match="body had .* of .* bytes"):
        ck.read_tensor("model.norm.weight")


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_botocore_retry_settings_are_the_users(tiny_llamas, bucket, put_s3_dir, s3_faults, monkeypatch):
    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    ck = open_checkpoint(uri)
    s3_faults.configure(fraction=1.0, kinds=("503",), max_faults_per_request=1000)
    s3_faults.clear_log()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    with pytest.raises(StorageError, match="ServiceUnavailable"):
        ck.read_tensor("lm_head.weight")
    assert len(s3_faults.requests("GET")) == 3  # exactly the attempts configured


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_throttling_is_backed_off_and_retried(tiny_llamas, bucket, put_s3_dir, s3_faults):
    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    ck = open_checkpoint(uri)
    s3_faults.configure(fraction=1.0, kinds=("slowdown",), max_faults_per_request=1)
    want = load_file(tiny_llamas["single"] / "model.safetensors")["model.norm.weight"]
    assert torch.equal(ck.read_tensor("model.norm.weight"), want)
    assert s3_faults.faults() == {"slowdown": 1}


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_read_many_runs_in_parallel(tiny_llamas, bucket, put_s3_dir, s3_faults, monkeypatch):
    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    ck = open_checkpoint(uri)
    names = list(ck.tensors)[:12]
    read_many([(ck, n) for n in names])  # warm the pool's clients
    s3_faults.configure(latency_s=0.1)
    t = time.perf_counter()
    read_many([(ck, n) for n in names], max_workers=1)
    serial = time.perf_counter() - t
    monkeypatch.setenv("MERGELINE_IO_THREADS", "16")
    t = time.perf_counter()
    got = read_many([(ck, n) for n in names])
    parallel = time.perf_counter() - t
    assert serial >= 12 * 0.1 and parallel < serial / 3, (serial, parallel)
    want = load_file(tiny_llamas["single"] / "model.safetensors")
    assert all(torch.equal(g, want[n]) for g, n in zip(got, names, strict=True))


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_versioned_bucket_pins_versions(tiny_llamas, bucket, put_s3_dir, s3_server, s3_faults):
    raw = boto3.client("s3", endpoint_url=s3_server)
    raw.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    local = tiny_llamas["single"]
    uri = put_s3_dir(local, bucket, "m")
    ck = open_checkpoint(uri)
    ident = ck.files["model.safetensors"]
    assert ident.version_id and ident.as_dict() == {"uri": f"{uri}/model.safetensors", "size": ident.size,
                                                    "etag": ident.etag, "version_id": ident.version_id}
    old = load_file(local / "model.safetensors")
    new = {k: v + 1 for k, v in old.items()}
    save_file(new, "/tmp/mergeline-test-new.safetensors", metadata={"format": "pt"})
    raw.upload_file("/tmp/mergeline-test-new.safetensors", bucket, "m/model.safetensors")
    # the opened checkpoint still reads the version it validated
    assert torch.equal(ck.read_tensor("lm_head.weight"), old["lm_head.weight"])
    again = open_checkpoint(uri)
    assert again.identity != ck.identity and again.files["model.safetensors"].version_id != ident.version_id
    assert torch.equal(again.read_tensor("lm_head.weight"), new["lm_head.weight"])


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_unversioned_overwrite_is_detected(tiny_llamas, bucket, put_s3_dir, s3_server, s3_faults):
    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    ck = open_checkpoint(uri)
    old = load_file(tiny_llamas["single"] / "model.safetensors")
    save_file({k: v * 2 for k, v in old.items()}, "/tmp/mergeline-test-x2.safetensors", metadata={"format": "pt"})
    boto3.client("s3", endpoint_url=s3_server).upload_file("/tmp/mergeline-test-x2.safetensors", bucket,
                                                           "m/model.safetensors")
    with pytest.raises(StorageError, match="changed since it was opened"):
        ck.read_tensor("lm_head.weight")


def test_missing_things_are_checkpoint_errors(bucket, s3_env):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        open_checkpoint(f"s3://{bucket}/nothing/here")
    with pytest.raises(CheckpointError, match="NoSuchBucket"):
        open_checkpoint("s3://no-such-bucket-mergeline/x")


def test_profiles_and_endpoint_from_aws_config(tiny_llamas, bucket, put_s3_dir, s3_server, tmp_path, monkeypatch):
    """A named profile carrying credentials and endpoint_url, as users configure MinIO or R2."""
    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    (tmp_path / "config").write_text(f"[profile lab]\nregion = us-east-1\nendpoint_url = {s3_server}\n")
    (tmp_path / "credentials").write_text("[lab]\naws_access_key_id = a\naws_secret_access_key = b\n")
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    ck = open_checkpoint(uri)
    want = load_file(tiny_llamas["single"] / "model.safetensors")
    assert torch.equal(ck.read_tensor("model.norm.weight"), want["model.norm.weight"])
    assert storage.is_complete(uri) is False  # a plain HF checkpoint has no marker


@pytest.mark.parametrize("s3_faults", [{"fraction": 0.3, "seed": 11}], indirect=True)
def test_large_ranges_are_read_in_parts(tiny_llamas, bucket, put_s3_dir, s3_faults, monkeypatch):
    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    ck = open_checkpoint(uri)
    monkeypatch.setenv("MERGELINE_RANGE_PART_MB", str(1000 / 2**20))  # 1000-byte parts
    name = "model.embed_tokens.weight"
    info = ck.tensors[name]
    s3_faults.clear_log()
    got = ck.read_tensor(name)
    assert torch.equal(got, load_file(tiny_llamas["single"] / "model.safetensors")[name])
    ranges = {r.range for r in s3_faults.requests("GET")}
    assert len(ranges) == -(-info.nbytes // 1000)
    assert f"bytes={info.start}-{info.start + 999}" in ranges and f"bytes={info.start + 1000}-{info.start + 1999}" in ranges


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_retry_settings_from_the_profile(tiny_llamas, bucket, put_s3_dir, s3_faults, tmp_path, monkeypatch):
    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    (tmp_path / "config").write_text(f"[profile flaky]\nregion = us-east-1\nendpoint_url = {s3_faults.endpoint}\n"
                                     "retry_mode = standard\nmax_attempts = 2\n"
                                     "aws_access_key_id = a\naws_secret_access_key = b\n")
    for var in ("AWS_ENDPOINT_URL", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "flaky")
    ck = open_checkpoint(uri)
    s3_faults.configure(fraction=1.0, kinds=("500",), max_faults_per_request=1000)
    s3_faults.clear_log()
    with pytest.raises(StorageError, match="InternalError"):
        ck.read_tensor("lm_head.weight")
    assert len(s3_faults.requests("GET")) == 2


def test_copy_file_local_and_server_side(bucket, s3_server, s3_env, tmp_path):
    from storage.uri import copy_file

    src = tmp_path / "a.bin"
    src.write_bytes(b"abc" * 1000)
    copy_file(str(src), str(tmp_path / "sub" / "b.bin"))
    assert (tmp_path / "sub" / "b.bin").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["b.bin"]  # no temp file left
    raw = boto3.client("s3", endpoint_url=s3_server)
    raw.put_object(Bucket=bucket, Key="x/a.bin", Body=src.read_bytes())
    copy_file(f"s3://{bucket}/x/a.bin", f"s3://{bucket}/y/b.bin")
    assert raw.get_object(Bucket=bucket, Key="y/b.bin")["Body"].read() == src.read_bytes()
    with pytest.raises(StorageError, match="not supported"):
        copy_file(str(src), f"s3://{bucket}/z")
