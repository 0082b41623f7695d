"""The landing convention, models_from selection and the watcher flow (real S3 endpoint, real Prefect API)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

import storage
from flows.recipe import RecipeError, parse_recipe
from flows.selection import SelectionError, load_recipes, resolve_recipe, scan_experts, select_experts
from flows.watcher import LANDED_EVENT, LandingLog, watch_experts
from storage.catalog import Catalog
from tests.factory import read_events, tiny_llama_zoo, upload_dir

MARKER = storage.COMPLETE_MARKER

SOUP = """\
name: soup
merge_method: linear
models_from:
  uri: {experts}
  pattern: "math*"
dtype: float32
output: {output}
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and two experts of one tiny Llama (1 layer: 4 merge units)."""
    return tiny_llama_zoo(tmp_path_factory.mktemp("watch-zoo"), n_experts=2, layers=1)


def _s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint)


def marker_for(local: Path, tags=()) -> bytes:
    """The marker a careful uploader writes: every file with its size (what mergeline writes) and tags."""
    files = {f.name: f.stat().st_size for f in sorted(local.iterdir()) if f.is_file()}
    return json.dumps({"files": files, "tags": list(tags)}).encode()


def land(local: Path, bucket: str, prefix: str, endpoint: str, tags=()) -> str:
    """The landing convention: remove any old marker, upload the files, write the marker last."""
    s3 = _s3(endpoint)
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/{MARKER}")
    uri = upload_dir(local, bucket, prefix, endpoint)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{MARKER}", Body=marker_for(local, tags))
    return uri


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- the landing convention, without Prefect ------------------------------------------------------


def test_scan_sorts_complete_from_half_uploaded_experts(zoo, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    _, (e0, e1) = zoo
    experts = tmp_path / "experts"
    for name in ("done", "no-marker", "size-mismatch", "stale-marker", "no-weights"):
        shutil.copytree(e0, experts / name)
    (experts / "done" / MARKER).write_bytes(marker_for(e0, tags=["math", "v1"]))
    (experts / "size-mismatch" / MARKER).write_bytes(
        json.dumps({"files": {"model.safetensors": 12345}}).encode())
    (experts / "stale-marker" / MARKER).write_bytes(
        json.dumps({"files": {"config.json": (e0 / "config.json").stat().st_size}}).encode())
    (experts / "no-weights" / "model.safetensors").unlink()
    (experts / "no-weights" / MARKER).write_bytes(b"")
    # sharded, index uploaded but one shard missing; and the same complete with an empty marker
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(e1).save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("model-*.safetensors"))) >= 2
    shutil.copytree(sharded, experts / "sharded-ok")
    (experts / "sharded-ok" / MARKER).write_bytes(b"")
    shutil.copytree(sharded, experts / "sharded-missing-shard")
    sorted((experts / "sharded-missing-shard").glob("model-*.safetensors"))[-1].unlink()
    (experts / "sharded-missing-shard" / MARKER).write_bytes(b"")
    shutil.copytree(e0, experts / ".mergeline-staging" / "x")   # staging areas are never experts
    (experts / "not-json").mkdir()
    (experts / "not-json" / MARKER).write_bytes(b"\x00garbage")

    scan = scan_experts(str(experts))
    assert sorted(scan.complete) == ["done", "sharded-ok"]
    assert scan.complete["done"].tags == ("math", "v1")
    assert "no _MERGELINE_COMPLETE" in scan.pending["no-marker"]
    assert "12345" in scan.pending["size-mismatch"]
    assert "not in _MERGELINE_COMPLETE" in scan.pending["stale-marker"]
    assert "no model.safetensors" in scan.pending["no-weights"]
    assert "missing" in scan.pending["sharded-missing-shard"]
    assert "neither empty nor JSON" in scan.pending["not-json"]
    assert not any(n.startswith(".") for n in [*scan.complete, *scan.pending])
    # a complete expert opens as a checkpoint
    assert storage.open_checkpoint(scan.complete["sharded-ok"].uri).param_count > 0


def test_models_from_selects_by_pattern_and_tags_never_its_own_output(zoo, tmp_path):
    import shutil

    _, (e0, _) = zoo
    experts = tmp_path / "experts"
    for name, tags in [("math-a", ["math"]), ("math-b", ["math", "beta"]), ("code", ["code"]), ("math-soup", [])]:
        shutil.copytree(e0, experts / name)
        (experts / name / MARKER).write_bytes(marker_for(e0, tags))
    shutil.copytree(e0, experts / "math-late")        # no marker yet

    def recipe(sel: str, output: str = "out/soup") -> object:
        return parse_recipe(f"merge_method: linear\nmodels_from: {sel}\noutput: {tmp_path / output}\n",
                            source="r.yaml")

    by_pattern = recipe(f"{{uri: {experts}, pattern: 'math-*'}}", output="experts/math-soup")
    assert [e.name for e in select_experts(by_pattern)] == ["math-a", "math-b"]   # not math-soup: its output
    by_tags = recipe(f"{{uri: {experts}, tags: [math, beta]}}")
    assert [e.name for e in select_experts(by_tags)] == ["math-b"]
    concrete = resolve_recipe(recipe(f"{{uri: {experts}, pattern: 'math-*'}}"))
    assert concrete.models_from is None and concrete.output == str(tmp_path / "out/soup")
    assert concrete.inputs == [str(experts / "math-a"), str(experts / "math-b"), str(experts / "math-soup")]
    assert str(experts / "math-b") in concrete.text       # the run's recipe text names every expert used
    with pytest.raises(SelectionError, match="selects no complete expert.*pending: math-late"):
        resolve_recipe(recipe(f"{{uri: {experts}, pattern: 'math-l*'}}"))


@pytest.mark.parametrize("models_from, message", [
    ("{pattern: '*'}", "must be a prefix URI or a mapping"),
    ("{uri: s3://b/experts, sort: name}", "unknown keys"),
    ("{uri: s3://b/experts, tags: [1]}", "tags must be"),
    ("{uri: s3://b/experts, latest: false}", "latest can only be true"),
])
def test_models_from_is_validated_when_the_recipe_loads(models_from, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(f"merge_method: linear\nmodels_from: {models_from}\n")
    with pytest.raises(RecipeError, match="either 'models'"):
        parse_recipe("merge_method: linear\nmodels: [s3://b/x]\nmodels_from: s3://b/experts\n")


def test_load_recipes_reports_bad_ones_and_keeps_the_rest(tmp_path):
    good = "merge_method: linear\nmodels_from: s3://b/experts\noutput: s3://b/merged/{n}\n"
    write(tmp_path / "r" / "a.yaml", good.format(n="a"))
    write(tmp_path / "r" / "b.yml", "name: a\n" + good.format(n="b"))            # same name as a.yaml
    write(tmp_path / "r" / "c.yaml", "merge_method: linear\nmodels_from: s3://b/experts\n")  # no output
    write(tmp_path / "r" / "d.yaml", "merge_method: nope\nmodels: [x]\n")
    write(tmp_path / "r" / "e.yaml", good.format(n="a/"))                          # a.yaml's output
    write(tmp_path / "r" / "notes.txt", "ignored")
    recipes, errors = load_recipes([str(tmp_path / "r"), str(tmp_path / "missing.yaml")])
    assert [r.name for r in recipes] == ["a"]
    assert len(errors) == 5, errors
    assert any(e.startswith(str(tmp_path / "r" / "e.yaml")) and "also the output of" in e for e in errors)
    assert any("also used by" in e for e in errors) and any("needs 'output:'" in e for e in errors)
    assert any("nope" in e for e in errors) and any("missing.yaml" in e for e in errors)


def test_recipes_that_merge_each_others_outputs_are_not_scheduled(tmp_path):
    """a publishes where b selects, b where c selects, c where a selects: the watcher would merge
    them in turn for ever. They are reported and left out; a recipe that only reads the cycle's
    output (d), or selects by tags (which mergeline's markers never carry), still runs."""
    exp = "s3://b/experts"
    r = tmp_path / "r"
    write(r / "a.yaml", f"merge_method: linear\nmodels_from: {{uri: {exp}, pattern: 'b-*'}}\noutput: {exp}/a-soup\n")
    write(r / "b.yaml", f"merge_method: linear\nmodels: [{exp}/a-soup, {exp}/math]\noutput: s3://b/out/c\n")
    write(r / "c.yaml", f"merge_method: task_arithmetic\nbase_model: s3://b/out/c\nmodels: [{exp}/x, {exp}/y]\n"
                        f"output: {exp}/b-soup\n")
    write(r / "d.yaml", f"merge_method: linear\nmodels_from: {exp}/\noutput: s3://b/out/d\n")
    write(r / "e.yaml", f"merge_method: linear\nmodels_from: {{uri: {exp}, tags: [math]}}\noutput: {exp}/e-soup\n")
    write(r / "f.yaml", f"merge_method: linear\nmodels_from: {{uri: {exp}, pattern: 'e-*'}}\noutput: {exp}/f-soup\n")
    recipes, errors = load_recipes(str(r))
    assert [x.name for x in recipes] == ["d", "e", "f"]   # e is not fed by f: its selection needs a tag
    assert len(errors) == 3, errors
    for name in "abc":
        [err] = [e for e in errors if e.startswith(str(r / f"{name}.yaml"))]
        assert "for ever; not scheduled" in err and f"{name} -> " in err and err.count(" -> ") == 3, err


def test_a_watch_whose_every_recipe_is_in_a_cycle_says_so(prefect_api, tmp_path, capsys):
    from flows.cli import main as cli

    exp = str(tmp_path / "experts")
    r = tmp_path / "r"
    write(r / "a.yaml", f"merge_method: linear\nmodels_from: {{uri: {exp}, pattern: 'b-*'}}\noutput: {exp}/a-soup\n")
    write(r / "b.yaml", f"merge_method: linear\nmodels_from: {{uri: {exp}, pattern: 'a-*'}}\noutput: {exp}/b-soup\n")
    assert cli(["watch", "--recipes", str(r), "--catalog", str(tmp_path / "c.duckdb"), "--json"]) == 2
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert "nothing to watch" in last and "for ever; not scheduled" in last, err
    assert len(json.loads(out)["errors"]) == 2


# -- the watcher on S3 ------------------------------------------------------------------------------


def test_two_step_upload_merges_once_after_the_marker_and_a_new_version_merges_again(
        prefect_api, zoo, bucket, s3_env, tmp_path):
    _, (e0, e1) = zoo
    experts = f"s3://{bucket}/experts"
    output = f"{experts}/soup"        # published under the experts prefix: it lands too, but never feeds itself
    write(tmp_path / "recipes" / "soup.yaml", SOUP.format(experts=experts, output=output))
    catalog_path = str(tmp_path / "catalog.duckdb")
    catalog = Catalog(catalog_path)

    def scan() -> dict:
        return watch_experts(recipes=str(tmp_path / "recipes"), catalog_path=catalog_path)

    # step 1: the files, not the marker; another expert, complete, that the recipe does not select
    upload_dir(e0, bucket, "experts/math", s3_env)
    land(e1, bucket, "experts/code", s3_env)
    first = scan()
    assert [x["name"] for x in first["landed"]] == ["code"]
    assert first["merges"] == [] and catalog.runs() == []
    assert "math" in first["scanned"][experts]["pending"]
    assert catalog.find_checkpoint(f"{experts}/math") is None

    # step 2: the marker, last: now it has landed, and the recipe selecting it merges, once
    _s3(s3_env).put_object(Bucket=bucket, Key=f"experts/math/{MARKER}", Body=marker_for(e0))
    second = scan()
    [landing] = second["landed"]
    v1 = storage.open_checkpoint(f"{experts}/math").identity
    assert (landing["label"], landing["identity"]) == ("math@v1", v1)
    [merge] = second["merges"]
    assert merge["action"] == "merged" and merge["because"] == ["math@v1"]
    [run] = catalog.runs()
    assert run["status"] == "succeeded" and run["trigger"] == "new-expert" and run["recipe_name"] == "soup"
    assert [(i["label"], i["identity"]) for i in run["inputs"]] == [("math@v1", v1)]   # the concrete version used
    assert storage.is_complete(output)

    # step 3: nothing new. The merged model published under experts/ is announced as landed, once, and
    # does not merge its own recipe again
    third = scan()
    assert [(x["name"], x["kind"]) for x in third["landed"]] == [("soup", "merged")]
    assert third["merges"] == []
    fourth = scan()
    assert fourth["landed"] == [] and fourth["merges"] == [] and len(catalog.runs()) == 1

    # step 4: a re-upload with new content (marker removed first, files, marker last)
    s3 = _s3(s3_env)
    s3.delete_object(Bucket=bucket, Key=f"experts/math/{MARKER}")
    upload_dir(e1, bucket, "experts/math", s3_env)
    mid = scan()
    assert mid["landed"] == [] and mid["merges"] == [] and "math" in mid["scanned"][experts]["pending"]
    s3.put_object(Bucket=bucket, Key=f"experts/math/{MARKER}", Body=marker_for(e1))
    fifth = scan()
    v2 = storage.open_checkpoint(f"{experts}/math").identity
    assert v2 != v1
    assert [(x["label"], x["identity"]) for x in fifth["landed"]] == [("math@v2", v2)]
    assert [m["action"] for m in fifth["merges"]] == ["merged"]
    newest, oldest = catalog.runs()
    assert oldest["id"] == run["id"] and newest["status"] == "succeeded"
    assert [(i["label"], i["identity"]) for i in newest["inputs"]] == [("math@v2", v2)]
    assert [v["version"] for v in catalog.show(f"{experts}/math")["versions"]] == [1, 2]
    # each identity registered once, announced once
    log = LandingLog.beside(catalog.path)
    assert sorted(x["label"] for x in log.landings()) == ["code@v1", "math@v1", "math@v2", "soup@v1"]

    # step 5: reverted to the first upload's bytes: v1 is the latest again, lands again, merges again
    s3.delete_object(Bucket=bucket, Key=f"experts/math/{MARKER}")
    upload_dir(e0, bucket, "experts/math", s3_env)
    s3.put_object(Bucket=bucket, Key=f"experts/math/{MARKER}", Body=marker_for(e0))
    sixth = scan()
    assert storage.open_checkpoint(f"{experts}/math").identity == v1
    assert [(x["label"], x["identity"]) for x in sixth["landed"] if x["name"] == "math"] == [("math@v1", v1)]
    assert [m["action"] for m in sixth["merges"]] == ["merged"]
    assert catalog.find_checkpoint("math")["identity"] == v1
    reverted = catalog.runs()[0]
    assert [(i["label"], i["identity"]) for i in reverted["inputs"]] == [("math@v1", v1)]
    assert [x for x in scan()["landed"] if x["name"] == "math"] == []  # and only once


def test_watcher_starts_runs_of_the_merge_deployment_once_and_emits_the_event(
        prefect_api, zoo, bucket, s3_env, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.merge_flow import merge_flow

    _, (e0, _) = zoo
    deployment_id = merge_flow.to_deployment(name=f"merge-{bucket}").apply()   # no worker: runs stay scheduled
    experts = f"s3://{bucket}/experts"
    write(tmp_path / "soup.yaml", SOUP.format(experts=experts, output=f"s3://{bucket}/merged/soup"))
    catalog_path = str(tmp_path / "catalog.duckdb")

    def scan() -> dict:
        return watch_experts(recipes=[str(tmp_path / "soup.yaml")], catalog_path=catalog_path,
                             merge_deployment=f"merge/merge-{bucket}")

    def runs() -> list:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))

    land(e0, bucket, "experts/math-1", s3_env)
    first = scan()
    [merge] = first["merges"]
    assert merge["action"] == "submitted"
    [run] = runs()
    assert str(run.id) == merge["flow_run_id"]
    assert run.parameters["trigger"] == "new-expert" and run.parameters["catalog_path"] == catalog_path
    assert f"{experts}/math-1" in run.parameters["recipe_text"]
    assert "models_from" not in run.parameters["recipe_text"]      # the concrete recipe, experts named
    assert scan()["merges"] == [] and len(runs()) == 1
    assert Catalog(catalog_path).runs() == []    # the merge itself runs wherever the deployment's worker is

    identity = first["landed"][0]["identity"]
    [event] = read_events(LANDED_EVENT, f"mergeline.expert.{experts}/math-1", timeout=30)
    assert event.resource["mergeline.expert.identity"] == identity
    assert event.payload["label"] == "math-1@v1"


def test_watch_command_prints_what_landed_and_fails_in_one_line(prefect_api, zoo, tmp_path, capsys):
    import shutil

    from flows.cli import main

    _, (e0, _) = zoo
    shutil.copytree(e0, tmp_path / "experts" / "code")
    (tmp_path / "experts" / "code" / MARKER).write_bytes(b"")
    write(tmp_path / "recipes" / "soup.yaml", SOUP.format(experts=tmp_path / "experts", output=tmp_path / "out"))
    args = ["watch", "--recipes", str(tmp_path / "recipes"), "--catalog", str(tmp_path / "c.duckdb")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "landed code@v1" in out and "soup" not in out        # soup selects math*, not code
    assert main(args) == 0 and "landed" not in capsys.readouterr().out
    write(tmp_path / "recipes" / "bad.yaml", "merge_method: nope\n")
    assert main(args) == 2
    assert "nope" in capsys.readouterr().err
