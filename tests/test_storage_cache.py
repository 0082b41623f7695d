"""The read-through cache: a re-run downloads nothing twice; bounded; shared by processes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from storage import ReadCache, open_checkpoint, read_many

NO_FAULTS = {"fraction": 0.0}


def object_gets(proxy):
    """GETs of objects (not bucket listings)."""
    return [r for r in proxy.requests("GET") if r.path.count("/") >= 2]


def read_all(ck):
    return dict(zip(ck.tensors, read_many([(ck, n) for n in ck.tensors]), strict=True))


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_rerun_downloads_nothing_twice(tiny_llamas, bucket, put_s3_dir, s3_faults, tmp_path, kind):
    uri = put_s3_dir(tiny_llamas[kind], bucket, "m")
    cache = ReadCache(tmp_path / "cache", 10**9)
    ck = open_checkpoint(uri, cache=cache)
    first = read_all(ck)
    ck.read_bytes("tokenizer.json")
    assert cache.stats.hits == 0 and cache.stats.misses > 0
    assert cache.stats.bytes_downloaded >= sum(t.nbytes for t in ck.tensors.values())
    assert object_gets(s3_faults)

    s3_faults.clear_log()
    again = ReadCache(tmp_path / "cache", 10**9)  # as a new process would
    ck2 = open_checkpoint(uri, cache=again)
    second = read_all(ck2)
    assert ck2.read_bytes("tokenizer.json") == (tiny_llamas[kind] / "tokenizer.json").read_bytes()
    assert again.stats.misses == 0 and again.stats.bytes_downloaded == 0 and again.stats.hits > len(ck.tensors)
    assert object_gets(s3_faults) == []  # only LIST and HEAD went over the wire
    assert ck2.identity == ck.identity
    want = {}
    for f in sorted(tiny_llamas[kind].glob("*.safetensors")):
        want |= load_file(f)
    for name, w in want.items():
        assert torch.equal(first[name], w) and torch.equal(second[name], w), name


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_a_checkpoint_travels_with_its_cache_to_another_process(tiny_llamas, bucket, put_s3_dir, s3_faults,
                                                                 tmp_path, monkeypatch):
    """A merge task's checkpoints are pickled to Dask workers: the cache goes as its directory and
    bound, and in the worker reads hit what the flow process downloaded."""
    import pickle

    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    monkeypatch.setenv("MERGELINE_CACHE_DIR", str(tmp_path / "cache"))
    cache = ReadCache.from_env()
    assert ReadCache.from_env() is cache  # one per process and directory
    ck = open_checkpoint(uri, cache=cache)
    want = read_all(ck)
    assert pickle.loads(pickle.dumps(ck)).cache is cache

    s3_faults.clear_log()
    worker = f"""
import pickle, sys
import torch
from tests.test_storage_cache import read_all
ck = pickle.loads(sys.stdin.buffer.read())
got = read_all(ck)
print(ck.cache.stats.hits, ck.cache.stats.misses, ck.cache.directory)
sys.stdout.flush()
torch.save(got, {str(tmp_path / "got.pt")!r})
"""
    env = {k: v for k, v in os.environ.items() if k != "MERGELINE_CACHE_DIR"}  # the worker is told nothing
    done = subprocess.run([sys.executable, "-c", worker], input=pickle.dumps(ck), capture_output=True, env=env,
                          check=True)
    hits, misses, directory = done.stdout.decode().split()
    assert int(hits) >= len(want) and int(misses) == 0 and directory == str(tmp_path / "cache")
    assert object_gets(s3_faults) == []
    got = torch.load(tmp_path / "got.pt")
    assert all(torch.equal(got[n], w) for n, w in want.items())


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_cache_is_keyed_by_range_and_identity(tiny_llamas, bucket, put_s3_dir, s3_server, s3_faults, tmp_path):
    local = tiny_llamas["single"]
    uri = put_s3_dir(local, bucket, "m")
    cache = ReadCache(tmp_path / "cache", 10**9)
    ck = open_checkpoint(uri, cache=cache)
    name = "model.embed_tokens.weight"
    want = load_file(local / "model.safetensors")[name]
    assert torch.equal(ck.read_tensor(name, rows=(0, 10)), want[:10])
    misses = cache.stats.misses
    assert torch.equal(ck.read_tensor(name, rows=(5, 20)), want[5:20])  # another range: another entry
    assert cache.stats.misses == misses + 1
    assert torch.equal(ck.read_tensor(name, rows=(0, 10)), want[:10])
    assert cache.stats.misses == misses + 1

    # the same URI with new bytes has a new identity: the old entries are never served for it
    doubled = {k: v * 2 for k, v in load_file(local / "model.safetensors").items()}
    save_file(doubled, tmp_path / "x2.safetensors", metadata={"format": "pt"})
    import boto3

    boto3.client("s3", endpoint_url=s3_server).upload_file(str(tmp_path / "x2.safetensors"), bucket,
                                                           "m/model.safetensors")
    ck2 = open_checkpoint(uri, cache=cache)
    assert torch.equal(ck2.read_tensor(name, rows=(0, 10)), doubled[name][:10])


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_cache_stays_within_its_bound(tiny_llamas, bucket, put_s3_dir, s3_faults, tmp_path):
    local = tiny_llamas["single"]
    uri = put_s3_dir(local, bucket, "m")
    limit = 20_000
    cache = ReadCache(tmp_path / "cache", limit)
    ck = open_checkpoint(uri, cache=cache)
    total = sum(t.nbytes for t in ck.tensors.values())
    assert total > 2 * limit
    got = read_all(ck)
    assert cache.size_bytes() <= limit and cache.stats.evictions > 0
    want = load_file(local / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_eviction_is_least_recently_used(tiny_llamas, bucket, put_s3_dir, s3_faults, tmp_path):
    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    ck = open_checkpoint(uri)  # headers without the cache, so only the reads below are entries
    ck.cache = cache = ReadCache(tmp_path / "cache", 10_000)  # evicts down to 9000 bytes
    small, embed, head = "model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"  # 64 B; 4096 B per 64 rows

    def step(name, rows=None):
        time.sleep(0.03)  # file mtimes are coarse: keep the order unambiguous
        ck.read_tensor(name, rows)

    step(small)                # created first ...
    step(embed, (0, 64))
    step(small)                # ... but used again: a hit makes it young
    step(embed, (64, 128))
    assert cache.stats.evictions == 0 and cache.stats.hits == 1
    step(head, (0, 64))        # 12352 bytes > 10000: evict the least recently used
    assert cache.stats.evictions == 1
    s3_faults.clear_log()
    ck.read_tensor(small)
    assert object_gets(s3_faults) == []  # kept (first in, but recently used)
    ck.read_tensor(embed, (0, 64))
    assert len(object_gets(s3_faults)) == 1  # evicted


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_damaged_entries_are_misses(tiny_llamas, bucket, put_s3_dir, s3_faults, tmp_path):
    uri = put_s3_dir(tiny_llamas["single"], bucket, "m")
    cache = ReadCache(tmp_path / "cache", 10**9)
    read_all(open_checkpoint(uri, cache=cache))
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file():
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # as if truncated by a crash
    again = ReadCache(tmp_path / "cache", 10**9)
    got = read_all(open_checkpoint(uri, cache=again))
    want = load_file(tiny_llamas["single"] / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert again.stats.misses > 0


CHILD = """
import hashlib, json, sys
from storage import ReadCache, open_checkpoint, read_many
cache = ReadCache(sys.argv[2], 10**9)
ck = open_checkpoint(sys.argv[1], cache=cache)
tensors = read_many([(ck, n) for n in ck.tensors])
print(json.dumps({n: hashlib.sha256(t.view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()
                  for n, t in zip(ck.tensors, tensors)}))
"""


def test_processes_share_one_cache(tiny_llamas, bucket, put_s3_dir, s3_env, tmp_path):
    """This process and a child fill one cache directory at the same time, then a third reader
    finds everything in it."""
    local = tiny_llamas["sharded"]
    uri = put_s3_dir(local, bucket, "m")
    cache_dir = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", CHILD, uri, str(cache_dir)], stdout=subprocess.PIPE,
                             env=dict(os.environ, MERGELINE_IO_THREADS="4"), text=True)
    want = {}
    for f in sorted(local.glob("*.safetensors")):
        want |= load_file(f)
    digests = {n: hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest() for n, t in want.items()}
    for _ in range(4):  # read, cold then warm, while the child starts and reads
        got = read_all(open_checkpoint(uri, cache=ReadCache(cache_dir, 10**9)))
        assert all(torch.equal(got[n], w) for n, w in want.items())
        if child.poll() is not None:
            break
    out = child.communicate(timeout=120)[0]
    assert child.returncode == 0 and json.loads(out) == digests
    assert not [p for p in cache_dir.rglob(".tmp-*")]  # no temp files left behind
    mine = ReadCache(cache_dir, 10**9)
    read_all(open_checkpoint(uri, cache=mine))
    assert mine.stats.misses == 0 and mine.stats.hits > 0


def test_local_reads_bypass_the_cache(tiny_llamas, tmp_path):
    cache = ReadCache(tmp_path / "cache", 10**9)
    read_all(open_checkpoint(str(tiny_llamas["single"]), cache=cache))
    assert (cache.stats.hits, cache.stats.misses) == (0, 0) and cache.size_bytes() == 0


def test_from_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGELINE_CACHE_DIR", raising=False)
    assert ReadCache.from_env() is None
    monkeypatch.setenv("MERGELINE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("MERGELINE_CACHE_MAX_GB", "0.5")
    cache = ReadCache.from_env()
    assert cache.directory == tmp_path / "c" and cache.max_bytes == 500_000_000


@pytest.mark.parametrize("s3_faults", [NO_FAULTS], indirect=True)
def test_tensor_names_never_become_paths(bucket, put_s3_dir, s3_faults, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    evil = {"../../../escaped": torch.ones(3), "a/b/../../c": torch.zeros(2), "/abs/path": torch.ones(1)}
    save_file(evil, src / "model.safetensors")
    (src / "config.json").write_text("{}")
    uri = put_s3_dir(src, bucket, "evil")
    cache = ReadCache(tmp_path / "work" / "cache", 10**9)
    ck = open_checkpoint(uri, cache=cache)
    for name, t in evil.items():
        assert torch.equal(ck.read_tensor(name), t)
    files = [p.relative_to(tmp_path / "work") for p in (tmp_path / "work").rglob("*") if p.is_file()]
    assert files and all(re.fullmatch(r"cache/[0-9a-f]{2}/[0-9a-f]{64}", str(f)) for f in files), files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "work"]
