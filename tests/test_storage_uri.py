"""Output URIs and names that must never escape their prefix."""

from __future__ import annotations

import os
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import CheckpointError, safe_component, staging_uri, validate_output_uri
from storage.uri import check_filename


@pytest.mark.parametrize("uri, want", [
    ("s3://bucket/models/m1", "s3://bucket/models/m1"),
    ("s3://bucket/models/m1/", "s3://bucket/models/m1"),
    ("/tmp/out/m1/", "/tmp/out/m1"),
    ("file:///tmp/out/m1", "/tmp/out/m1"),
])
def test_output_uri_is_normalised(uri, want):
    assert validate_output_uri(uri) == want


def test_relative_output_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert validate_output_uri("out/m1") == str(tmp_path / "out" / "m1")


@pytest.mark.parametrize("uri", [
    "s3://bucket/models/../other", "s3://bucket/..", "s3://bucket/a//b", "s3://bucket/./a", "s3://bucket",
    "s3://bucket/", "s3://Bad_Bucket/x", "/tmp/out/../../etc", "../x", "out/..", "gs://bucket/x", "", "/",
    "/tmp/a\nb", "C:\\models\\x",
])
def test_bad_output_uris_are_refused(uri):
    with pytest.raises(CheckpointError):
        validate_output_uri(uri)


def test_staging_is_deterministic_and_outside_the_output():
    for out in ("s3://bucket/models/m1", "/tmp/out/m1", "s3://bucket/m1"):
        staging = staging_uri(out)
        assert staging == staging_uri(out + "/")
        assert not (staging + "/").startswith(out + "/")
        assert staging.rsplit("/", 1)[0] != out.rsplit("/", 1)[0]  # a hidden sibling folder, not a sibling model
    assert staging_uri("s3://bucket/m1") == "s3://bucket/.mergeline-staging/m1"


@given(st.text(min_size=1, max_size=40))
def test_safe_component_is_one_plain_reversible_component(name):
    comp = safe_component(name)
    assert "/" not in comp and "\\" not in comp and not comp.startswith(".") and comp not in ("", ".", "..")
    assert os.path.basename(comp) == comp
    assert urllib.parse.unquote(comp) == name


@pytest.mark.parametrize("name", ["../x.safetensors", "a/b.safetensors", ".hidden", "", "x\0y", "..", "/abs"])
def test_check_filename_refuses_paths(name):
    with pytest.raises(CheckpointError):
        check_filename(name, "test")


def test_check_filename_accepts_hf_names():
    for name in ("model-00001-of-00002.safetensors", "config.json", "tokenizer.model"):
        assert check_filename(name) == name
