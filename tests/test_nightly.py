"""The nightly merge: merges what changed, records a skipped run (and does no work) for what did not."""

from __future__ import annotations

import json

import boto3
import pytest

import storage
from flows import nightly
from flows.cli import main as cli
from flows.nightly import nightly_merge, open_inputs, unchanged_since_last
from flows.recipe import load_recipe
from flows.selection import resolve_recipe
from storage.catalog import Catalog
from tests.factory import tiny_llama_zoo, upload_dir
from tests.test_watcher import land, write

ARITHMETIC = """\
name: arith
merge_method: task_arithmetic
base_model: {base}
models_from: {{uri: {experts}, tags: [nightly]}}
parameters: {{weight: 0.5}}
output: {output}
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tiny_llama_zoo(tmp_path_factory.mktemp("nightly-zoo"), n_experts=3, layers=1)


def test_nightly_merges_changes_and_records_unchanged_inputs_as_skipped(
        prefect_api, zoo, bucket, s3_env, tmp_path, monkeypatch):
    base, (e0, e1, e2) = zoo
    experts = f"s3://{bucket}/experts"
    base_uri = upload_dir(base, bucket, "base", s3_env)
    output = f"s3://{bucket}/merged/arith"
    land(e0, bucket, "experts/a", s3_env, tags=["nightly"])
    land(e1, bucket, "experts/b", s3_env, tags=["nightly"])
    land(e2, bucket, "experts/c", s3_env, tags=["other"])          # not selected: wrong tag
    recipe_file = write(tmp_path / "recipes" / "arith.yaml",
                        ARITHMETIC.format(base=base_uri, experts=experts, output=output))
    catalog_path = str(tmp_path / "catalog.duckdb")
    catalog = Catalog(catalog_path)

    first = nightly_merge(recipes=[str(tmp_path / "recipes")], catalog_path=catalog_path)
    [result] = first["recipes"]
    assert result["action"] == "merged"
    [run] = catalog.runs()
    assert (run["status"], run["trigger"]) == ("succeeded", "nightly")
    assert [i["label"] for i in run["inputs"]] == ["a@v1", "b@v1"] and run["base_label"] == "base@v1"
    published = storage.open_checkpoint(output).identity
    marker = boto3.client("s3", endpoint_url=s3_env).head_object(
        Bucket=bucket, Key=f"merged/arith/{storage.COMPLETE_MARKER}")["ETag"]

    # unchanged: a skipped run is recorded, and no merge runs (it would fail here), nothing is written
    def no_merge(*args, **kwargs):
        raise AssertionError("the nightly run merged although its inputs had not changed")

    with monkeypatch.context() as patched:
        patched.setattr(nightly, "run_merge", no_merge)
        second = nightly_merge(recipes=[str(recipe_file)], catalog_path=catalog_path)
    [result] = second["recipes"]
    assert result["action"] == "skipped" and result["same_as_run"] == run["id"]
    skipped, succeeded = catalog.runs()
    assert succeeded["id"] == run["id"]
    assert (skipped["status"], skipped["trigger"], skipped["output_id"]) == ("skipped", "nightly", None)
    assert [(i["uri"], i["identity"]) for i in skipped["inputs"]] == [(i["uri"], i["identity"]) for i in run["inputs"]]
    assert storage.open_checkpoint(output).identity == published
    assert boto3.client("s3", endpoint_url=s3_env).head_object(
        Bucket=bucket, Key=f"merged/arith/{storage.COMPLETE_MARKER}")["ETag"] == marker
    assert catalog.last_successful_run("arith")["id"] == run["id"]

    # a changed expert (b re-landed with c's weights): merged again, with the new version recorded
    land(e2, bucket, "experts/b", s3_env, tags=["nightly"])
    third = nightly_merge(recipes=[str(recipe_file)], catalog_path=catalog_path)
    assert [r["action"] for r in third["recipes"]] == ["merged"]
    newest = catalog.runs()[0]
    assert newest["status"] == "succeeded" and [i["label"] for i in newest["inputs"]] == ["a@v1", "b@v2"]
    assert storage.open_checkpoint(output).identity != published

    # and the comparison itself: a retired (deleted) output is not 'unchanged', neither is another recipe text
    concrete = resolve_recipe(load_recipe(recipe_file))
    base_ck, expert_cks = open_inputs(concrete)
    assert unchanged_since_last(catalog, concrete, base_ck, expert_cks)["id"] == newest["id"]
    edited = load_recipe(write(tmp_path / "edited" / "arith.yaml", recipe_file.read_text().replace("0.5", "0.6")))
    assert unchanged_since_last(catalog, resolve_recipe(edited), base_ck, expert_cks) is None
    boto3.client("s3", endpoint_url=s3_env).delete_object(Bucket=bucket, Key=f"merged/arith/{storage.COMPLETE_MARKER}")
    assert unchanged_since_last(catalog, concrete, base_ck, expert_cks) is None


def test_one_broken_recipe_fails_the_run_but_not_the_others(prefect_api, zoo, tmp_path, capsys):
    base, (e0, _, _) = zoo
    import shutil

    shutil.copytree(e0, tmp_path / "experts" / "a")
    (tmp_path / "experts" / "a" / storage.COMPLETE_MARKER).write_bytes(b"")
    write(tmp_path / "recipes" / "good.yaml", ARITHMETIC.replace("tags: [nightly]", "pattern: '*'").format(
        base=base, experts=tmp_path / "experts", output=tmp_path / "out" / "good"))
    write(tmp_path / "recipes" / "empty.yaml", ARITHMETIC.replace("name: arith", "name: empty").format(
        base=base, experts=tmp_path / "experts", output=tmp_path / "out" / "empty"))   # selects nothing
    catalog_path = str(tmp_path / "catalog.duckdb")
    state = nightly_merge(recipes=str(tmp_path / "recipes"), catalog_path=catalog_path, return_state=True)
    assert state.is_failed() and "empty" in state.message and "selects no complete expert" in state.message
    [run] = Catalog(catalog_path).runs()
    assert run["recipe_name"] == "arith" and run["status"] == "succeeded"
    assert storage.is_complete(str(tmp_path / "out" / "good"))

    # the command still says what it did for the other recipes, as JSON too, and exits non-zero
    capsys.readouterr()
    assert cli(["nightly", "--recipes", str(tmp_path / "recipes"), "--catalog", catalog_path, "--json"]) == 2
    out, err = capsys.readouterr()
    actions = {r["recipe"]: r["action"] for r in json.loads(out)["recipes"]}
    assert actions == {"arith": "skipped", "empty": "failed"}, out
    assert "selects no complete expert" in err.strip().splitlines()[-1]
    assert cli(["nightly", "--recipes", str(tmp_path / "recipes"), "--catalog", catalog_path]) == 2
    out, err = capsys.readouterr()
    assert "arith: skipped" in out and "empty: failed" in out
