"""Streamed shard writing and atomic publish, local and S3, checked with safetensors and transformers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import boto3
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import storage
from storage import (
    COMPLETE_MARKER,
    CheckpointError,
    ShardWriter,
    abort_staging,
    is_complete,
    open_checkpoint,
    publish_checkpoint,
    restage_shard,
    restore_replaced,
    staged_shard,
    staging_uri,
)
from storage.version import code_version


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


def by_layer(names) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.match(r"model\.layers\.(\d+)\.", n)
        groups.setdefault(f"layer{m.group(1)}" if m else "rest", []).append(n)
    keys = sorted(groups)
    return {f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors": groups[k] for i, k in enumerate(keys)}


def write_shards(ck, staging, dtype, groups=None):
    shards = []
    for filename, names in (groups or by_layer(ck.tensors)).items():
        specs = [(n, dtype, ck.tensors[n].shape) for n in names]
        with ShardWriter(staging, filename, specs, metadata={"producer": "test"}) as w:
            for n in names:
                w.write(n, ck.read_tensor(n).to(dtype))
        shards.append(w.result)
    return shards


def publish(ck, out, dtype, groups=None, **sidecar):
    staging = staging_uri(out)
    shards = write_shards(ck, staging, dtype, groups)
    sidecar = {"recipe": {"method": "copy"}, "inputs": [{"uri": ck.uri, "identity": ck.identity,
                                                         "files": list(ck.files.values())}], **sidecar}
    return publish_checkpoint(out, staging, shards, config_source=ck, dtype=dtype, sidecar=sidecar)


# --- ShardWriter ------------------------------------------------------------------------------


def test_shard_writer_matches_safetensors(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(7, 5).bfloat16(), "w.f32": torch.randn(3), "w.i64": torch.arange(6).reshape(2, 3),
        "w.bool": torch.rand(4) > 0.5, "w.scalar": torch.tensor(1.5, dtype=torch.float16),
        "w.empty": torch.zeros(0, 3), "w.f8": torch.randn(9).to(torch.float8_e4m3fn),
        "w.noncontig": torch.randn(4, 6).t(),
    }
    staging = str(tmp_path / "staging")
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ShardWriter(staging, "model-00001-of-00001.safetensors", specs, metadata={"k": "v"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    path = tmp_path / "staging" / "model-00001-of-00001.safetensors"
    got = load_file(path)
    for n, t in tensors.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape, n
        assert torch.equal(got[n].reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), n
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    r = w.result
    assert r.size == path.stat().st_size and r.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert r.tensors == tuple(tensors) and r.uri == str(path) and r.filename == path.name
    assert staged_shard(staging, path.name) == r
    assert sorted(os.listdir(staging)) == [path.name, path.name + ".shard.json"]  # no temp files


def test_tensors_stream_in_row_blocks(tmp_path):
    big = torch.randn(10, 4)
    with ShardWriter(str(tmp_path), "s.safetensors", [("a", torch.float32, (10, 4)), ("b", torch.int32, (2,))]) as w:
        for r0, r1 in [(0, 3), (3, 3), (3, 10)]:
            w.write("a", big[r0:r1])
        w.write("b", torch.tensor([1, 2], dtype=torch.int32))
    got = load_file(tmp_path / "s.safetensors")
    assert torch.equal(got["a"], big) and got["b"].tolist() == [1, 2]


SPECS = [("a", torch.float32, (4, 2)), ("b", torch.bfloat16, (3,))]


@pytest.mark.parametrize("action, error", [
    (lambda w: w.write("b", torch.zeros(3, dtype=torch.bfloat16)), "expected 'a' next"),
    (lambda w: w.write("a", torch.zeros(4, 2, dtype=torch.float64)), "should be torch.float32"),
    (lambda w: w.write("a", torch.zeros(4, 3)), "has shape"),
    (lambda w: (w.write("a", torch.zeros(3, 2)), w.write("a", torch.zeros(2, 2))), "has shape"),
    (lambda w: w.write("a", torch.zeros(4, 2)), "'b' and later tensors were not written"),
    (lambda w: (w.write("a", torch.zeros(4, 2)), w.write("b", torch.zeros(3, dtype=torch.bfloat16)),
                w.write("c", torch.zeros(1))), "after all tensors"),
    (lambda w: (w.write("a", torch.zeros(4, 2)), 1 / 0), "division by zero"),
])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failed_shard_leaves_nothing_at_its_name(tmp_path, where, action, error, request):
    if where == "s3":
        bucket = request.getfixturevalue("bucket")
        staging = f"s3://{bucket}/.mergeline-staging/m"
    else:
        staging = str(tmp_path / "staging")
    with ShardWriter(staging, "x.safetensors", SPECS) as w:  # an earlier, finished attempt
        w.write("a", torch.ones(4, 2))
        w.write("b", torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises((ValueError, ZeroDivisionError), match=error):
        with ShardWriter(staging, "x.safetensors", SPECS) as w:
            action(w)
    assert w.result is None
    assert staged_shard(staging, "x.safetensors") is None
    assert not storage.uri.exists(storage.uri.join(staging, "x.safetensors"))
    if where == "local":
        assert os.listdir(staging) == []  # no temp file either


def test_shard_writer_refuses_bad_names(tmp_path):
    for name in ("../x.safetensors", "a/b.safetensors", ".x.safetensors", "x.bin"):
        with pytest.raises((CheckpointError, ValueError)):
            ShardWriter(str(tmp_path), name, SPECS)
    with pytest.raises(ValueError, match="unique"):
        ShardWriter(str(tmp_path), "x.safetensors", SPECS + SPECS)


# --- publish (local) --------------------------------------------------------------------------


def test_local_publish_is_a_loadable_hf_checkpoint(tiny_llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_llamas["single"]
    ck = open_checkpoint(str(src))
    out = tmp_path / "models" / "merged"
    published = publish(ck, str(out), torch.float32, started_at="2026-01-01T00:00:00+00:00")

    assert is_complete(str(out)) and not Path(staging_uri(str(out))).exists()
    assert not (tmp_path / "models" / ".mergeline-staging").exists()
    names = sorted(os.listdir(out))
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) == 3 and names == sorted(shards + [
        COMPLETE_MARKER, "config.json", "generation_config.json", "mergeline.json",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"])
    for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / n).read_bytes() == (src / n).read_bytes()
    config, source_config = (json.loads((p / "config.json").read_text()) for p in (out, src))
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in source_config.items() if k not in ("dtype", "torch_dtype")}

    want = {n: t.float() for n, t in load_file(src / "model.safetensors").items()}
    got = load_dir(out)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    assert index["weight_map"] == {n: f.name for f in out.glob("model-*") for n in load_file(f)}

    side = json.loads((out / "mergeline.json").read_text())
    assert side["recipe"] == {"method": "copy"} and side["code_version"] == code_version()
    assert side["inputs"][0]["identity"] == ck.identity
    assert side["inputs"][0]["files"][0] == ck.files["model.safetensors"].as_dict()
    assert datetime.fromisoformat(side["published_at"]) > datetime.fromisoformat(side["started_at"])
    assert {s["filename"]: s["sha256"] for s in side["shards"]} == \
        {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.glob("model-*")}

    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    assert all(torch.equal(state[n].float(), want[n]) for n in want)
    assert published.uri == str(out) and published.identity == open_checkpoint(str(out)).identity
    assert all(torch.equal(published.read_tensor(n), want[n]) for n in want)


def test_a_model_with_its_own_code_keeps_it_and_loads_with_trust_remote_code(tiny_llamas, tmp_path):
    """config.json's auto_map names Python files beside it (Phi-3, DeepSeek, InternLM, Qwen-1)."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "custom"
    shutil.copytree(tiny_llamas["single"], src)
    (src / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny'\n")
    (src / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    (src / "tiny.tiktoken").write_text("IQ== 0\n")
    config = json.loads((src / "config.json").read_text())
    config |= {"model_type": "tiny", "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                                                  "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    publish(open_checkpoint(str(src)), str(out), torch.float32)
    for name in ("configuration_tiny.py", "modeling_tiny.py", "tiny.tiktoken"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "TinyForCausalLM"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shard_another_writer_replaced_in_staging_is_not_published(tiny_llamas, tmp_path, where, request):
    """A stalled run that lost the output's lock and woke up writes the same shard names, sizes
    and tensor names: only the staged object's identity tells its shard from this run's."""
    ck = open_checkpoint(str(tiny_llamas["single"]))
    out = str(tmp_path / "merged") if where == "local" else (
        f"s3://{request.getfixturevalue('bucket')}/merged" if request.getfixturevalue("s3_env") else "")
    staging = staging_uri(out)
    mine = write_shards(ck, staging, torch.float32)
    theirs = mine[1]
    specs = [(n, torch.float32, ck.tensors[n].shape) for n in theirs.tensors]
    with ShardWriter(staging, theirs.filename, specs, metadata={"producer": "test"}) as w:
        for n in theirs.tensors:
            w.write(n, ck.read_tensor(n).float() * 2)   # the other run's values, the same layout
    assert w.result.size == theirs.size and w.result.etag != theirs.etag
    sidecar = {"recipe": {"method": "copy"}}
    with pytest.raises(CheckpointError, match=f"{theirs.filename}: replaced in staging since this run wrote it"):
        publish_checkpoint(out, staging, mine, config_source=ck, dtype=torch.float32, sidecar=sidecar)
    assert not is_complete(out)


def test_a_restaged_shard_is_recorded_as_staged(tiny_llamas, tmp_path):
    """A cached unit's shard copied back from the published model counts as staged afterwards,
    so a run killed while publishing resumes from it instead of merging it again."""
    ck = open_checkpoint(str(tiny_llamas["single"]))
    out = str(tmp_path / "merged")
    [first, *_] = publish(ck, out, torch.float32) and json.loads((Path(out) / "mergeline.json").read_text())["shards"]
    staging = staging_uri(out)
    info = storage.ShardInfo(first["filename"], f"{staging}/{first['filename']}", first["size"], first["sha256"], ())
    copied = restage_shard(f"{out}/{first['filename']}", info)
    assert staged_shard(staging, first["filename"]) == copied and copied.etag is not None


def test_a_model_a_killed_publish_moved_aside_is_put_back(tiny_llamas, tmp_path):
    ck = open_checkpoint(str(tiny_llamas["single"]))
    out = tmp_path / "merged"
    publish(ck, str(out), torch.float32)
    aside = Path(staging_uri(str(out)) + ".replaced")
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.rename(out, aside)   # where a publish without an atomic swap is killed between its renames
    assert restore_replaced(str(out)) and is_complete(str(out)) and not aside.exists()
    assert not restore_replaced(str(out))   # nothing to do when the model is there


def test_republish_swaps_the_models_in_one_step(tiny_llamas, tmp_path, monkeypatch):
    """Readers of the output never find it missing: the new model and the old swap places."""
    from storage import writer

    ck = open_checkpoint(str(tiny_llamas["single"]))
    out = str(tmp_path / "merged")
    publish(ck, out, torch.float32)
    swaps = []
    real = writer._exchange
    monkeypatch.setattr(writer, "_exchange", lambda a, b: swaps.append((a, b)) or real(a, b))
    monkeypatch.setattr(writer.os, "rename", _no_rename_of(out, writer.os.rename))
    publish(ck, out, torch.bfloat16)
    assert swaps == [(staging_uri(out), out)]
    assert open_checkpoint(out).tensors[next(iter(ck.tensors))].torch_dtype == torch.bfloat16


def _no_rename_of(out: str, rename):
    def guarded(src, dst, *a, **kw):
        assert src != out, "the old model was renamed away: readers would find no model for a moment"
        return rename(src, dst, *a, **kw)
    return guarded


def test_republish_replaces_the_older_model(tiny_llamas, tmp_path):
    ck = open_checkpoint(str(tiny_llamas["single"]))
    out = str(tmp_path / "merged")
    publish(ck, out, torch.float32)
    first = set(os.listdir(out))
    other = open_checkpoint(str(tiny_llamas["expert"]))
    publish(other, out, torch.bfloat16, groups={"model-00001-of-00001.safetensors": list(other.tensors)})
    names = set(os.listdir(out))
    assert "model-00003-of-00003.safetensors" in first and "model-00003-of-00003.safetensors" not in names
    want = load_file(tiny_llamas["expert"] / "model.safetensors")
    got = load_dir(Path(out))
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_publish_refuses_to_replace_a_foreign_directory(tiny_llamas, tmp_path):
    foreign = tmp_path / "someones-model"
    shutil.copytree(tiny_llamas["single"], foreign)
    before = sorted(os.listdir(foreign))
    ck = open_checkpoint(str(tiny_llamas["single"]))
    with pytest.raises(CheckpointError, match="did not write"):
        publish(ck, str(foreign), torch.float32)
    assert sorted(os.listdir(foreign)) == before


def test_publish_refuses_a_file_or_a_folder_of_folders_and_leaves_them(tiny_llamas, tmp_path):
    """A folder holding only folders (a directory of models) lists no files: it must still be
    refused, not renamed away and deleted. So must a plain file at the output path."""
    models = tmp_path / "models"
    shutil.copytree(tiny_llamas["single"], models / "base")
    (tmp_path / "notes.txt").write_text("mine")
    ck = open_checkpoint(str(tiny_llamas["single"]))
    with pytest.raises(CheckpointError, match=r"holds folders \(base\)"):
        publish(ck, str(models), torch.float32)
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        publish(ck, str(tmp_path / "notes.txt"), torch.float32)
    assert sorted(os.listdir(models / "base")) == sorted(os.listdir(tiny_llamas["single"]))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_output_that_is_or_holds_an_input_is_refused(tiny_llamas, tmp_path):
    merged = str(tmp_path / "merged")
    publish(open_checkpoint(str(tiny_llamas["single"])), merged, torch.float32)  # a mergeline output
    with pytest.raises(CheckpointError, match="is an input of this merge"):
        storage.check_output(merged, [merged + "/"])
    with pytest.raises(CheckpointError, match="holds an input of this merge"):
        storage.check_output(str(tmp_path), [merged])
    with pytest.raises(CheckpointError, match="is inside an input of this merge"):
        storage.check_output(merged + "/sub", [merged])
    (tmp_path / "link").symlink_to(merged)
    with pytest.raises(CheckpointError, match="is an input of this merge"):
        storage.check_output(merged, [str(tmp_path / "link")])
    assert storage.check_output(merged, [str(tiny_llamas["single"])]) == merged


def test_an_s3_prefix_holding_models_is_refused(tiny_llamas, bucket, s3_env):
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.put_object(Bucket=bucket, Key="models/math/config.json", Body=b"{}")
    with pytest.raises(CheckpointError, match=r"holds folders \(math\)"):
        storage.check_output(f"s3://{bucket}/models")
    assert storage.check_output(f"s3://{bucket}/models/new") == f"s3://{bucket}/models/new"


def test_published_shards_are_readable_like_the_other_files(tiny_llamas, tmp_path):
    """Shards are created private (mkstemp) but must end up with the mode the umask gives config.json."""
    out = tmp_path / "merged"
    publish(open_checkpoint(str(tiny_llamas["single"])), str(out), torch.float32)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_publish_checks_its_shards(tiny_llamas, tmp_path):
    ck = open_checkpoint(str(tiny_llamas["single"]))
    out = str(tmp_path / "merged")
    staging = staging_uri(out)
    shards = write_shards(ck, staging, torch.float32)
    kw = {"config_source": ck, "dtype": torch.float32, "sidecar": {}}
    elsewhere = write_shards(ck, str(tmp_path / "elsewhere"), torch.float32)
    with pytest.raises(CheckpointError, match="not in staging"):
        publish_checkpoint(out, staging, shards[:1] + elsewhere[1:], **kw)
    dup = dataclasses.replace(shards[0], filename="dup.safetensors", uri=os.path.join(staging, "dup.safetensors"),
                              etag=None)
    shutil.copy(shards[0].uri, dup.uri)
    with pytest.raises(CheckpointError, match="in both"):
        publish_checkpoint(out, staging, shards + [dup], **kw)
    with open(shards[0].uri, "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointError, match="bytes in staging"):
        publish_checkpoint(out, staging, shards, **kw)
    with pytest.raises(CheckpointError, match="no shards"):
        publish_checkpoint(out, staging, [], **kw)
    with pytest.raises(CheckpointError, match=r"'\.\.'"):
        publish_checkpoint(str(tmp_path / ".." / "x"), staging, shards, **kw)
    assert not os.path.exists(out)


KILLED_WRITER = """
import sys, time, torch
from storage import ShardWriter
staging_local, staging_s3 = sys.argv[1], sys.argv[2]
specs = [("a", torch.float32, (64, 64)), ("b", torch.float32, (64, 64))]
for staging in (staging_local, staging_s3):
    with ShardWriter(staging, "model-00001-of-00002.safetensors", specs) as w:
        w.write("a", torch.ones(64, 64)); w.write("b", torch.ones(64, 64))
writers = [ShardWriter(s, "model-00002-of-00002.safetensors", specs).__enter__() for s in (staging_local, staging_s3)]
for w in writers:
    w.write("a", torch.ones(64, 64))
    w._file.flush()
print("halfway", flush=True)
time.sleep(120)
"""


def test_killed_writer_leaves_nothing_that_looks_complete(bucket, s3_env, tmp_path, monkeypatch):
    out_local, out_s3 = str(tmp_path / "merged"), f"s3://{bucket}/models/merged"
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setenv("MERGELINE_SPOOL_DIR", str(spool))
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, staging_uri(out_local), staging_uri(out_s3)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "halfway"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    for out in (out_local, out_s3):
        staging = staging_uri(out)
        assert not is_complete(out)
        with pytest.raises(CheckpointError):
            open_checkpoint(out)
        assert not storage.uri.exists(storage.uri.join(staging, "model-00002-of-00002.safetensors"))
        assert staged_shard(staging, "model-00002-of-00002.safetensors") is None
        done = staged_shard(staging, "model-00001-of-00002.safetensors")  # a restart finds this one again
        data = storage.reader.read_small(storage.uri.stat(done.uri), None)
        assert done.tensors == ("a", "b") and done.size == len(data) and done.sha256 == hashlib.sha256(data).hexdigest()
    assert not os.path.exists(out_local)
    assert len(os.listdir(spool)) == 1  # the S3 writer's half-written spool file
    for out in (out_local, out_s3):
        abort_staging(staging_uri(out))
        assert storage.uri.list_dir(staging_uri(out)) == {}
    assert os.listdir(spool) == []


# --- publish (S3) -----------------------------------------------------------------------------


def test_an_s3_publish_removes_what_killed_writers_spooled_for_it(tiny_llamas, bucket, s3_env, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("MERGELINE_SPOOL_DIR", str(tmp_path / "spool"))
    (tmp_path / "spool").mkdir()
    out = f"s3://{bucket}/models/merged"
    left = tmp_path / "spool" / (storage.writer._spool_prefix(staging_uri(out)) + "x.safetensors")
    left.write_bytes(b"a killed writer's whole shard")
    other = tmp_path / "spool" / (storage.writer._spool_prefix(staging_uri(out + "-2")) + "x.safetensors")
    other.write_bytes(b"another output's")
    publish(open_checkpoint(str(tiny_llamas["single"])), out, torch.float32)
    assert is_complete(out) and not left.exists() and other.exists()


def download(uri: str, local: Path, endpoint: str) -> Path:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=endpoint)
    local.mkdir(parents=True)
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        client.download_file(bucket, obj["Key"], str(local / obj["Key"][len(prefix) + 1:]))
    return local


@pytest.mark.parametrize("s3_faults", [{"fraction": 0.2, "seed": 3}], indirect=True)
def test_s3_publish_under_faults_loads_with_transformers(tiny_llamas, bucket, s3_server, s3_faults, tmp_path):
    from transformers import AutoModelForCausalLM

    ck = open_checkpoint(str(tiny_llamas["single"]))
    out = f"s3://{bucket}/models/merged"
    published = publish(ck, out, torch.bfloat16)
    assert s3_faults.injected > 5
    assert is_complete(out) and published.uri == out
    assert storage.uri.list_dir(staging_uri(out)) == {}
    local = download(out, tmp_path / "copy", s3_server)
    expected = set(os.listdir(tiny_llamas["single"])) - {"model.safetensors"} | {
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
        "model.safetensors.index.json", "mergeline.json", COMPLETE_MARKER}
    assert set(os.listdir(local)) == expected
    want = load_file(tiny_llamas["single"] / "model.safetensors")
    state = AutoModelForCausalLM.from_pretrained(local).state_dict()
    assert all(torch.equal(state[n], want[n]) for n in want)
    assert all(torch.equal(published.read_tensor(n), want[n]) for n in want)


@pytest.mark.parametrize("s3_faults", [{"fraction": 0.2, "seed": 5}], indirect=True)
def test_large_s3_shards_go_multipart(tiny_llamas, bucket, s3_faults, monkeypatch):
    monkeypatch.setenv("MERGELINE_MULTIPART_THRESHOLD_MB", "5")
    monkeypatch.setenv("MERGELINE_MULTIPART_CHUNK_MB", "5")
    ck = open_checkpoint(str(tiny_llamas["single"]))
    out = f"s3://{bucket}/big"
    staging = staging_uri(out)
    big = torch.randn(1536, 1024)  # 6 MiB: two parts
    with ShardWriter(staging, "model-00002-of-00002.safetensors", [("extra.big", torch.float32, big.shape)]) as w:
        for r0 in range(0, 1536, 512):
            w.write("extra.big", big[r0:r0 + 512])
    shards = write_shards(ck, staging, torch.bfloat16, {"model-00001-of-00002.safetensors": list(ck.tensors)})
    published = publish_checkpoint(out, staging, shards + [w.result], config_source=ck, dtype=torch.bfloat16,
                                   sidecar={})
    uploads = [r for r in s3_faults.requests("POST", "model-00002") if r.query == "uploads"]
    parts = {r.query for r in s3_faults.requests("PUT", "model-00002") if "partNumber" in r.query and r.status}
    assert len(uploads) >= 2 and len(parts) >= 4  # multipart upload to staging, then multipart copy
    assert torch.equal(published.read_tensor("extra.big"), big)
    assert s3_faults.injected > 0


def test_interrupted_s3_publish_is_incomplete_then_completes(tiny_llamas, bucket, s3_env, monkeypatch):
    out = f"s3://{bucket}/models/merged"
    publish(open_checkpoint(str(tiny_llamas["single"])), out, torch.float32)  # an older complete model
    assert is_complete(out)
    expert = open_checkpoint(str(tiny_llamas["expert"]))
    staging = staging_uri(out)
    shards = write_shards(expert, staging, torch.bfloat16, {"model-00001-of-00001.safetensors": list(expert.tensors)})
    real_copy = storage.s3.copy

    def dies_at_the_index(src_bucket, src_key, dst_bucket, dst_key, **kw):
        if dst_key.endswith("model.safetensors.index.json"):
            raise KeyboardInterrupt("killed")
        real_copy(src_bucket, src_key, dst_bucket, dst_key, **kw)

    monkeypatch.setattr(storage.s3, "copy", dies_at_the_index)
    kw = {"config_source": expert, "dtype": torch.bfloat16, "sidecar": {"try": 1}}
    with pytest.raises(KeyboardInterrupt):
        publish_checkpoint(out, staging, shards, **kw)
    assert not is_complete(out)  # neither the old model nor the new one
    with pytest.raises(CheckpointError, match="incomplete"):
        open_checkpoint(out)
    monkeypatch.setattr(storage.s3, "copy", real_copy)
    done = publish_checkpoint(out, staging, shards, **kw)  # the restarted publish finds its staging intact
    want = load_file(tiny_llamas["expert"] / "model.safetensors")
    assert all(torch.equal(done.read_tensor(n), want[n]) for n in want)
    assert sorted(storage.uri.list_dir(out)) == sorted([
        COMPLETE_MARKER, "config.json", "generation_config.json", "mergeline.json", "model-00001-of-00001.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"])  # no stale shards


def test_abort_staging_removes_unfinished_multipart_uploads(bucket, s3_server, s3_env):
    staging = staging_uri(f"s3://{bucket}/m")
    _, key = storage.s3.split_s3_uri(staging)
    raw = boto3.client("s3", endpoint_url=s3_server)
    raw.put_object(Bucket=bucket, Key=f"{key}/model-00001.safetensors", Body=b"x")
    raw.create_multipart_upload(Bucket=bucket, Key=f"{key}/model-00002.safetensors")
    raw.put_object(Bucket=bucket, Key="m-sibling/keep", Body=b"x")
    abort_staging(staging)
    assert raw.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert [o["Key"] for o in raw.list_objects_v2(Bucket=bucket)["Contents"]] == ["m-sibling/keep"]
