"""The merge flow end to end: real Prefect API, real S3 endpoint over HTTP, real DuckDB file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import storage
from flows.cli import main as cli
from flows.merge_flow import run_merge
from flows.plan import make_plan
from flows.recipe import load_recipe, parse_recipe
from merge_ops import merge_tensors
from storage.catalog import Catalog
from tests.factory import download_dir, read_events, tiny_llama_zoo, upload_dir

MERGEKIT_TIES = """\
# a mergekit config, unchanged
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {e0}
    parameters:
      density: 0.4
      weight: 1.0
  - model: {e1}
    parameters:
      density: 0.6
      weight: 0.5
  - model: {e2}
    parameters:
      density: 0.4
      weight: 0.7
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return tiny_llama_zoo(root, n_experts=3, layers=3)


@pytest.fixture
def s3_zoo(zoo, bucket, s3_env):
    base, experts = zoo
    return upload_dir(base, bucket, "zoo/base", s3_env), [
        upload_dir(e, bucket, f"zoo/experts/{e.name}", s3_env) for e in experts
    ]


def write_recipe(path: Path, base: str, experts: list[str], text: str = MERGEKIT_TIES) -> Path:
    path.write_text(text.format(base=base, e0=experts[0], e1=experts[1], e2=experts[2]))
    return path


def expected_merge(zoo, recipe_text: str) -> dict[str, torch.Tensor]:
    """merge_ops applied directly to the same tensors, loaded independently with safetensors."""
    base_dir, expert_dirs = zoo
    r = parse_recipe(recipe_text.format(base="b", e0="x0", e1="x1", e2="x2"))
    base = load_file(base_dir / "model.safetensors")
    experts = [load_file(d / "model.safetensors") for d in expert_dirs]
    return {
        name: merge_tensors(r.method, [e[name] for e in experts], base[name], weights=list(r.weights),
                            seed=r.seed, name=name, out_dtype=getattr(torch, r.out_dtype), **r.parameters)
        for name in base
    }


def load_output(uri: str, tmp: Path, endpoint: str | None) -> tuple[dict[str, torch.Tensor], Path]:
    local = download_dir(uri, tmp, endpoint) if uri.startswith("s3://") else Path(uri)
    tensors = {}
    for shard in sorted(local.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors, local


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def test_s3_merge_equals_merge_ops_loads_and_is_recorded(prefect_api, zoo, s3_zoo, s3_env, bucket, tmp_path):
    base, experts = s3_zoo
    recipe = write_recipe(tmp_path / "ties.yaml", base, experts)
    catalog = tmp_path / "catalog.duckdb"
    out = f"s3://{bucket}/merged/ties-v1"
    assert cli(["merge", str(recipe), "--output", out, "--catalog", str(catalog)]) == 0

    assert storage.is_complete(out)
    got, local = load_output(out, tmp_path / "out", s3_env)
    assert_same(got, expected_merge(zoo, MERGEKIT_TIES))
    model = AutoModelForCausalLM.from_pretrained(local)
    assert model.config.num_hidden_layers == 3
    assert len(list(local.glob("model-*.safetensors"))) == 3 + 3  # 3 layers + embed, norm, lm_head

    cat = Catalog(catalog)
    [run] = cat.runs()
    assert run["status"] == "succeeded" and run["method"] == "ties"
    lineage = cat.lineage(out)
    assert str(lineage).count("expert-") >= 3


def test_tensors_over_the_memory_budget_stream_from_s3_with_identical_output(
        prefect_api, zoo, s3_zoo, s3_env, bucket, tmp_path, monkeypatch, capsys):
    """A budget that holds a layer's tensors whole but not the embeddings': those are read from S3
    and merged a window of rows at a time (TIES: three passes), to the same bits."""
    import json

    from merge_ops import scratch_bytes

    base, experts = s3_zoo
    recipe = write_recipe(tmp_path / "ties.yaml", base, experts)
    embed = 96 * 32 * (4 * 2 + 2)  # vocab x hidden x (4 bf16 inputs + the bf16 output)
    monkeypatch.setenv("MERGELINE_MEMORY_BUDGET_MB", str((scratch_bytes(3, "cpu", streamed=True) + 0.8 * embed) / 2**20))
    out = f"s3://{bucket}/merged/streamed"
    assert cli(["plan", str(recipe), "--output", out, "--json"]) == 0
    units = {u["name"]: u for u in json.loads(capsys.readouterr().out)["units"]}
    assert {n for n, u in units.items() if u["streamed_tensors"]} == {"model.embed_tokens", "lm_head"}
    assert units["model.embed_tokens"]["peak_bytes"] < embed + scratch_bytes(3, "cpu", streamed=True)

    assert cli(["merge", str(recipe), "--output", out, "--catalog", str(tmp_path / "c.duckdb")]) == 0
    got, _ = load_output(out, tmp_path / "out", s3_env)
    assert_same(got, expected_merge(zoo, MERGEKIT_TIES))


LINEAR = """\
models:
  - model: {e0}
  - model: {e1}
  - model: {e2}
merge_method: linear
dtype: bfloat16
"""


@pytest.mark.parametrize("method, cores, streamed", [
    ("linear", 2, True),   # read once when streamed: the budget is shared so that two units merge at once
    ("linear", 1, False),  # one core: nothing to gain from sharing
    ("ties", 2, False),    # TIES reads a streamed tensor three times: it keeps the whole budget
])
def test_units_stream_what_would_keep_the_other_cores_idle(prefect_api, zoo, tmp_path, monkeypatch, capsys,
                                                           method, cores, streamed):
    """A budget too small for two of these units at once (their chunk buffers alone fill it), that
    holds an embedding's merge whole: on two cores a single-pass method gives each unit half the
    budget, so the embeddings stream; TIES (three passes when streamed) and one core do not."""
    import json

    from merge_ops import scratch_bytes

    base, experts = zoo
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts],
                          LINEAR if method == "linear" else MERGEKIT_TIES)
    inputs = 3 + (method != "linear")
    embed = 96 * 32 * (inputs * 2 + 2)  # vocab x hidden x (bf16 inputs + the bf16 output)
    monkeypatch.setenv("MERGELINE_MEMORY_BUDGET_MB", str((scratch_bytes(3, "cpu", streamed=True) + 1.5 * embed) / 2**20))
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    out = tmp_path / "merged"
    assert cli(["plan", str(recipe), "--output", str(out), "--json"]) == 0
    units = json.loads(capsys.readouterr().out)["units"]
    assert {u["name"] for u in units if u["streamed_tensors"]} == ({"model.embed_tokens", "lm_head"} if streamed else set())
    if streamed:
        assert cli(["merge", str(recipe), "--output", str(out), "--catalog", str(tmp_path / "c.duckdb")]) == 0
        got, _ = load_output(str(out), tmp_path, None)
        assert_same(got, expected_merge(zoo, LINEAR))


def test_read_cache_downloads_each_range_of_an_s3_input_once(
        prefect_api, zoo, s3_zoo, s3_env, bucket, tmp_path, monkeypatch, capsys):
    """MERGELINE_CACHE_DIR: a streamed TIES merge reads its embeddings three times, from S3 once;
    a second merge of the same inputs downloads nothing."""
    import storage.reader
    from merge_ops import scratch_bytes

    base, experts = s3_zoo
    recipe = write_recipe(tmp_path / "ties.yaml", base, experts)
    embed = 96 * 32 * (4 * 2 + 2)
    monkeypatch.setenv("MERGELINE_MEMORY_BUDGET_MB", str((scratch_bytes(3, "cpu", streamed=True) + 0.8 * embed) / 2**20))
    assert cli(["plan", str(recipe), "--output", f"s3://{bucket}/merged/x"]) == 0
    squeezed = lambda text: "".join(text.split())  # noqa: E731 (rich wraps lines at its width)
    assert squeezed("from S3 on every pass: set MERGELINE_CACHE_DIR") in squeezed(capsys.readouterr().out)
    monkeypatch.setenv("MERGELINE_CACHE_DIR", str(tmp_path / "cache"))
    assert cli(["plan", str(recipe), "--output", f"s3://{bucket}/merged/x"]) == 0
    assert squeezed(f"then from the read cache in {tmp_path / 'cache'}") in squeezed(capsys.readouterr().out)
    downloads = []  # (file, start, end) of every read from an input on S3
    read_into = storage.reader.read_into

    def counted(ident, start, out):
        if ident.uri.startswith((base, *experts)):
            downloads.append((ident.uri, start, start + len(out)))
        return read_into(ident, start, out)

    monkeypatch.setattr(storage.reader, "read_into", counted)
    read = {}  # the summary's read_cache counts of each run
    for run in ("first", "second"):
        downloads.clear()
        out = f"s3://{bucket}/merged/cached-{run}"
        assert cli(["merge", str(recipe), "--output", out, "--catalog", str(tmp_path / "c.duckdb"), "--json"]) == 0
        read[run] = json.loads(capsys.readouterr().out)["read_cache"]
        got, _ = load_output(out, tmp_path / run, s3_env)
        assert_same(got, expected_merge(zoo, MERGEKIT_TIES))
        if run == "first":
            assert len(downloads) > 4 * len(got) and len(set(downloads)) == len(downloads)
            tensors = [d for d in downloads if d[0].endswith(".safetensors")]  # not the configs publish copies
            assert read[run]["misses"] == len(tensors)
            assert read[run]["bytes_downloaded"] == sum(end - start for _, start, end in tensors)
            assert read[run]["hits"] > 0      # the streamed embeddings' second and third passes
        else:
            assert downloads == []
            assert read[run]["misses"] == read[run]["bytes_downloaded"] == 0
    # the second run read through the cache every byte the first one read, downloaded or not
    first = read["first"]
    assert read["second"]["bytes_from_cache"] == first["bytes_downloaded"] + first["bytes_from_cache"]


def progress_shown(output: str) -> float:
    """What the Prefect UI shows as the merge's progress: its flow run's progress artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    run_id = json.loads((Path(output) / storage.SIDECAR_NAME).read_text())["flow_run_id"]
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["merge-progress"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return artifact.data


def test_second_identical_run_is_all_cache_hits(prefect_api, zoo, tmp_path):
    base, experts = zoo
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts]),
                         output=str(tmp_path / "merged"))
    first = run_merge(recipe, catalog_path=str(tmp_path / "c.duckdb"))
    assert first["cached"] == [] and len(first["computed"]) == first["units"] == 6
    assert progress_shown(first["output"]) == 100.0  # however few updates the UI was sent
    before, _ = load_output(first["output"], tmp_path, None)
    files = {p.name: p.stat().st_ino for p in Path(first["output"]).iterdir()}
    second = run_merge(recipe, catalog_path=str(tmp_path / "c.duckdb"))
    assert second["computed"] == [] and len(second["cached"]) == 6
    after, _ = load_output(second["output"], tmp_path, None)
    assert_same(after, before)
    assert_same(after, expected_merge(zoo, MERGEKIT_TIES))
    # the output already was this model: not copied again, so no new identity and no new version
    assert {p.name: p.stat().st_ino for p in Path(first["output"]).iterdir()} == files
    assert second["model_id"] == first["model_id"] and second["identity"] == first["identity"]
    assert not Path(storage.staging_uri(first["output"])).exists()
    assert [r["status"] for r in Catalog(tmp_path / "c.duckdb").runs()] == ["succeeded", "succeeded"]


def test_a_merge_from_the_terminal_sends_no_heartbeats_unless_the_user_asks(prefect_api, zoo, tmp_path):
    """Heartbeats only let an automation crash a run nobody watches; a terminal's run does without them
    (they cost up to a second at its end), and a frequency the user set is kept."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    base, experts = zoo
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts])
    catalog = Catalog(str(tmp_path / "c.duckdb"))

    def merge(out: str) -> str:
        assert cli(["merge", str(recipe), "--output", str(tmp_path / out), "--catalog", str(catalog.path)]) == 0
        return next(r["flow_run_id"] for r in catalog.runs() if r["output_uri"] == str(tmp_path / out))

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        asked = merge("asked")
    plain = merge("plain")
    assert read_events("prefect.flow-run.heartbeat", f"prefect.flow-run.{asked}", timeout=30)
    assert read_events("prefect.flow-run.Completed", f"prefect.flow-run.{plain}", timeout=30)  # its events arrived
    assert read_events("prefect.flow-run.heartbeat", f"prefect.flow-run.{plain}", timeout=0) == []


def test_local_inputs_mapped_into_memory_merge_to_the_same_bits(prefect_api, zoo, tmp_path, monkeypatch):
    """Every local tensor mapped (storage maps only those of 1 MiB and more; the zoo's are smaller):
    the merge reads the files' own pages and gives the bits merge_ops gives on loaded tensors."""
    monkeypatch.setattr(storage.reader, "_MAP_MIN", 0)
    mapped = []
    map_range = storage.reader.map_range
    monkeypatch.setattr(storage.reader, "map_range",
                        lambda ident, a, b: mapped.append((ident.uri, a)) or map_range(ident, a, b))
    base, experts = zoo
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts]),
                         output=str(tmp_path / "merged"))
    got, _ = load_output(run_merge(recipe, catalog_path=str(tmp_path / "c.duckdb"))["output"], tmp_path, None)
    assert_same(got, expected_merge(zoo, MERGEKIT_TIES))
    aligned = {(ck.files[t.file].uri, t.start) for ck in map(storage.open_checkpoint, map(str, [base, *experts]))
               for t in ck.tensors.values() if t.start % 8 == 0}  # the others are read
    assert len(aligned) >= 2 * len(got) and aligned <= set(mapped)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_only_unfinished_units(prefect_api, tmp_path, sig):
    """SIGKILL (OOM kill) and SIGTERM (eviction, cancel): the finished layers are kept for the re-run."""
    base, experts = tiny_llama_zoo(tmp_path / "zoo", n_experts=3, layers=12, hidden=128)
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts])
    output = tmp_path / "merged"
    staging = Path(storage.staging_uri(str(output)))
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

    # the same API and result store as this process, as a second machine or a restarted worker would
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(),
               PREFECT_LOCAL_STORAGE_PATH=str(PREFECT_LOCAL_STORAGE_PATH.value()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "merge", str(recipe), "--output", str(output),
         "--catalog", str(tmp_path / "c.duckdb"), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(staging.glob("model-*.safetensors"))) < 4:
        assert proc.poll() is None, "the merge finished before it could be killed"
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait()
    assert not storage.is_complete(str(output))
    assert len(list(staging.glob("model-*.safetensors"))) >= 4

    summary = run_merge(load_recipe(recipe, output=str(output)), catalog_path=str(tmp_path / "c.duckdb"))
    assert 0 < len(summary["cached"]) < summary["units"] == 15
    killed, resumed = sorted(Catalog(tmp_path / "c.duckdb").runs(), key=lambda r: r["started_at"])
    assert resumed["status"] == "succeeded" and killed["status"] == "failed"  # not 'running' for ever
    if sig == signal.SIGKILL:  # nothing in the process could say so: the run that took the output over did
        assert killed["error"].startswith("abandoned: ") and resumed["id"] in killed["error"]
    assert len(summary["computed"]) == summary["units"] - len(summary["cached"])
    got, _ = load_output(str(output), tmp_path, None)
    assert_same(got, expected_merge((base, experts), MERGEKIT_TIES))


def test_a_cache_hit_never_takes_another_recipes_staged_shard(prefect_api, zoo, tmp_path):
    """Every recipe with this output stages into one folder: after a killed run of recipe B, a
    re-run of recipe A must not publish B's shards under A's (cached) shard records."""
    base, experts = zoo
    output, catalog = tmp_path / "merged", str(tmp_path / "c.duckdb")
    text_b = MERGEKIT_TIES.replace("weight: 0.5", "weight: 0.25")
    recipe_a = write_recipe(tmp_path / "a.yaml", str(base), [str(e) for e in experts])
    recipe_b = write_recipe(tmp_path / "b.yaml", str(base), [str(e) for e in experts], text_b)
    run_merge(load_recipe(recipe_a, output=str(output)), catalog_path=catalog)  # A's units now cached
    run_merge(load_recipe(recipe_b, output=str(output)), catalog_path=catalog, replace=True)
    staging = Path(storage.staging_uri(str(output)))  # what a killed run of B leaves behind
    staging.mkdir(parents=True)
    for shard in json.loads((output / storage.SIDECAR_NAME).read_text())["shards"]:
        name = shard["filename"]
        shutil.copy(output / name, staging / name)
        with safe_open(str(staging / name), "pt") as f:
            tensors = list(f.keys())
        (staging / f"{name}.shard.json").write_text(json.dumps(
            {"filename": name, "uri": str(staging / name), "size": shard["size"], "sha256": shard["sha256"],
             "tensors": tensors}))
    shutil.rmtree(output)

    summary = run_merge(load_recipe(recipe_a, output=str(output)), catalog_path=catalog)
    assert summary["cached"] == [] and len(summary["computed"]) == summary["units"]
    got, _ = load_output(str(output), tmp_path, None)
    assert_same(got, expected_merge(zoo, MERGEKIT_TIES))


def test_a_recipe_replaces_its_own_model_and_another_recipes_only_with_replace(prefect_api, zoo, tmp_path, capsys):
    """A one-off merge pointed at a production output must not silently replace that model."""
    base, experts = zoo
    output, catalog = tmp_path / "merged", str(tmp_path / "c.duckdb")
    nightly = write_recipe(tmp_path / "nightly.yaml", str(base), [str(e) for e in experts])
    trial = write_recipe(tmp_path / "trial.yaml", str(base), [str(e) for e in experts],
                         MERGEKIT_TIES.replace("weight: 0.5", "weight: 0.25"))
    run_merge(load_recipe(nightly, output=str(output)), catalog_path=catalog)
    published = (output / storage.SIDECAR_NAME).read_bytes()

    for args in (["plan"], ["merge", "--catalog", catalog]):
        assert cli([*args, str(trial), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert "holds the model of recipe 'nightly'" in err and "'trial'" in err and "--replace" in err, err
    assert (output / storage.SIDECAR_NAME).read_bytes() == published

    changed = MERGEKIT_TIES.replace("weight: 0.5", "weight: 0.75")  # the same recipe, edited: replaces its own
    nightly.write_text(changed.format(base=base, e0=experts[0], e1=experts[1], e2=experts[2]))
    run_merge(load_recipe(nightly, output=str(output)), catalog_path=catalog)
    assert cli(["merge", str(trial), "--output", str(output), "--catalog", catalog, "--replace"]) == 0
    assert json.loads((output / storage.SIDECAR_NAME).read_text())["recipe"]["name"] == "trial"
    failed = [r for r in Catalog(catalog).runs() if r["status"] == "failed"]
    assert len(failed) == 1 and "holds the model of recipe 'nightly'" in failed[0]["error"]


def test_s3_faults_are_retried_with_identical_output(prefect_api, zoo, s3_zoo, s3_faults, bucket, tmp_path):
    base, experts = s3_zoo
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, experts), output=f"s3://{bucket}/merged/faulty")
    summary = run_merge(recipe, catalog_path=str(tmp_path / "c.duckdb"))
    assert s3_faults.injected > 0
    got, _ = load_output(summary["output"], tmp_path / "out", os.environ["AWS_ENDPOINT_URL"])
    assert_same(got, expected_merge(zoo, MERGEKIT_TIES))


def test_dask_cluster_gives_identical_output(prefect_api, zoo, s3_zoo, s3_env, bucket, tmp_path, monkeypatch):
    """Worker processes merge the units; with MERGELINE_CACHE_DIR set on the flow's machine they
    also fill the read cache (the checkpoints they receive carry it)."""
    from distributed import LocalCluster

    base, experts = s3_zoo
    text = MERGEKIT_TIES.replace("merge_method: ties", "merge_method: dare_ties")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, experts, text), output=f"s3://{bucket}/merged/dask")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.setenv("MERGELINE_CACHE_DIR", str(tmp_path / "cache"))  # after the workers started
        summary = run_merge(recipe, runner="dask", address=cluster.scheduler_address,
                            catalog_path=str(tmp_path / "c.duckdb"))
    got, _ = load_output(summary["output"], tmp_path / "out", s3_env)
    assert_same(got, expected_merge(zoo, text))
    tensor_bytes = sum(t.nbytes for uri in (base, *experts) for t in storage.open_checkpoint(uri).tensors.values())
    assert storage.ReadCache(tmp_path / "cache", 10**9).size_bytes() >= tensor_bytes  # the workers' downloads


def test_a_dask_address_that_is_not_a_scheduler_fails_fast(zoo, tmp_path):
    """A port that accepts connections but never speaks Dask (a web server, a typo'd port) hung
    the merge at its start; now the handshake is bounded and the error names the address."""
    import socket

    from flows.merge_flow import _check_scheduler

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ValueError, match=f"no Dask scheduler answered at {address} within 2 s"):
            _check_scheduler(address, timeout=2)  # unbounded, this never returned
    started = time.monotonic()
    with pytest.raises(ValueError, match=f"no Dask scheduler at {address}.*ConnectionRefusedError"):
        _check_scheduler(address, timeout=30)  # the port is closed now: refused, so no waiting out the 30 s
    assert time.monotonic() - started < 25


def test_invalid_inputs_fail_before_any_task(prefect_api, zoo, tmp_path, capsys):
    base, experts = zoo
    other, _ = tiny_llama_zoo(tmp_path / "other", n_experts=0, layers=2)  # one layer fewer
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(experts[0]), str(other), str(experts[2])])
    output = tmp_path / "merged"
    assert cli(["merge", str(recipe), "--output", str(output), "--catalog", str(tmp_path / "c.duckdb")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.2" in err and "Traceback" not in err
    assert not output.exists() and not Path(storage.staging_uri(str(output))).exists()
    [run] = Catalog(tmp_path / "c.duckdb").runs()  # the attempt is on record, as failed, with no output
    assert run["status"] == "failed" and "model.layers.2" in run["error"] and run["output_uri"] is None

    assert cli(["plan", str(recipe), "--output", str(output)]) == 2
    assert "model.layers.2" in capsys.readouterr().err


def test_an_output_holding_other_models_is_refused_by_plan_and_merge_before_any_work(prefect_api, zoo, tmp_path,
                                                                                     capsys):
    base, experts = zoo
    models = tmp_path / "models"  # a folder of checkpoints, no files of its own
    shutil.copytree(experts[0], models / "math")
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts])
    for command in (["plan"], ["merge", "--catalog", str(tmp_path / "c.duckdb")]):
        assert cli([*command, str(recipe), "--output", str(models)]) == 2
        assert "holds folders (math)" in capsys.readouterr().err
    assert sorted(p.name for p in models.iterdir()) == ["math"]
    assert sorted(os.listdir(models / "math")) == sorted(os.listdir(experts[0]))
    assert not Path(storage.staging_uri(str(models))).exists()


def test_a_unit_that_fails_on_bad_data_stops_the_merge_cleanly(prefect_api, tmp_path):
    """NaN in one expert's layer: the command names the tensor and the expert's path in one line,
    prints no traceback, and leaves no output and no staging (the other units stopped first)."""
    base, experts = tiny_llama_zoo(tmp_path / "zoo", n_experts=3, layers=6)
    weights = experts[1] / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts])
    output = tmp_path / "merged"
    from prefect.settings import PREFECT_API_URL

    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "merge", str(recipe), "--output", str(output),
         "--catalog", str(tmp_path / "c.duckdb")],
        env=dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value()), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "model.layers.3.mlp.up_proj.weight" in last and f"expert 1 ({experts[1]})" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not output.exists() and not Path(storage.staging_uri(str(output))).parent.exists()


def test_a_recipe_whose_evaluation_suite_is_missing_fails_at_plan(zoo, tmp_path, capsys):
    base, experts = zoo
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts],
                          MERGEKIT_TIES + f"evaluate: {tmp_path / 'no-suite.yaml'}\n")
    assert cli(["plan", str(recipe), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "evaluate: suite file not found" in err and "no-suite.yaml" in err


def test_what_the_evaluation_needs_is_checked_at_plan(zoo, tmp_path, capsys):
    """Otherwise the model is published and recorded as a success, and only then does its
    evaluation fail (and an unchanged nightly would never evaluate it)."""
    base, experts = zoo
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    (tmp_path / "suite.yaml").write_text(
        "name: s\ntasks:\n  - {name: t, metric: exact_match, data: t.jsonl, split: held-in, expert: math}\n"
        "  - {name: u, metric: exact_match, data: t.jsonl, split: held-out}\n")
    cases = {
        "linear with no base": (f"merge_method: linear\nmodels: [{experts[0]}, {experts[1]}]\n"
                                f"evaluate: {tmp_path / 'suite.yaml'}\n", "held-out tasks"),
        "unknown expert": (MERGEKIT_TIES + f"evaluate: {{{{suite: {tmp_path / 'suite.yaml'}, experts: {{{{code: {experts[0]}}}}}}}}}\n",
                           "no tasks for expert(s) code"),
        "missing expert": (MERGEKIT_TIES + f"evaluate: {{{{suite: {tmp_path / 'suite.yaml'}, experts: {{{{math: {tmp_path}/nope}}}}}}}}\n",
                           "expert math:"),
    }
    for name, (text, message) in cases.items():
        recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts], text)
        assert cli(["plan", str(recipe), "--output", str(tmp_path / "m")]) == 2, name
        assert message in capsys.readouterr().err, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
def test_eval_names_a_misspelt_expert_and_an_absent_gpu_and_knows_a_merged_model(prefect_api, zoo, tmp_path, capsys):
    base, experts = zoo
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ntasks:\n  - {name: t, metric: exact_match, data: t.jsonl, split: held-in, expert: math}\n")
    common = ["eval", str(experts[1]), "--suite", str(suite), "--catalog", str(tmp_path / "c.duckdb")]
    assert cli([*common, "--expert", f"maths={experts[0]}"]) == 2
    assert "no tasks for expert(s) maths; its experts are math" in capsys.readouterr().err
    assert cli([*common, "--expert", f"math={experts[0]}", "--device", "cuda"]) == 2
    assert "--device cuda, but torch sees no CUDA device" in capsys.readouterr().err
    assert Catalog(tmp_path / "c.duckdb").find_checkpoint(str(experts[1]))["kind"] == "expert"

    # a model mergeline wrote, evaluated before any catalog knew it, is registered as merged
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts])
    merged = run_merge(load_recipe(recipe, output=str(tmp_path / "m")), catalog_path=str(tmp_path / "other.duckdb"))
    fresh = ["--suite", str(suite), "--catalog", str(tmp_path / "fresh.duckdb"), "--expert", f"maths={experts[0]}"]
    assert cli(["eval", merged["output"], *fresh]) == 2
    assert Catalog(tmp_path / "fresh.duckdb").find_checkpoint(merged["output"])["kind"] == "merged"


def test_plan_prints_units_without_merging(zoo, tmp_path, capsys):
    import json

    base, experts = zoo
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts])
    assert cli(["plan", str(recipe), "--output", str(tmp_path / "m"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(u["name"] for u in plan["units"]) == sorted([
        "model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm", "lm_head",
    ])
    assert sum(u["tensors"] for u in plan["units"]) == len(load_file(base / "model.safetensors"))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float8_e4m3fn])
def test_tensors_no_kernel_merges_are_refused_at_plan(tmp_path, capsys, dtype):
    """An integer buffer, a mask or a float8 weight (whose scales a per-element merge ignores) is
    named from the headers, before any unit runs; the merge would have failed at its unit."""
    base, experts = tiny_llama_zoo(tmp_path / "zoo", n_experts=3, layers=2)
    for model in (base, *experts):
        tensors = load_file(model / "model.safetensors")
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(dtype)
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts])
    assert cli(["plan", str(recipe), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"{base}: tensor 'model.layers.1.mlp.up_proj.weight' is {str(dtype).removeprefix('torch.')}" in err
    assert "bfloat16, float16, float32, float64 tensors are merged" in err


def test_linear_writes_the_first_experts_dtype_not_the_unused_bases(tmp_path):
    base, _ = tiny_llama_zoo(tmp_path / "fp32", n_experts=1, layers=1, dtype=torch.float32)
    _, experts = tiny_llama_zoo(tmp_path / "bf16", n_experts=2, layers=1)
    for method, dtype in (("linear", torch.bfloat16), ("task_arithmetic", torch.float32)):
        text = f"merge_method: {method}\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {e}\n" for e in experts)
        plan = make_plan(parse_recipe(text, output=str(tmp_path / "m")))
        assert set(plan.out_dtypes.values()) == {dtype} and plan.dtype == dtype, method


@pytest.mark.parametrize("error, retried", [
    (OSError("connection reset"), True), (RuntimeError("worker lost"), True), (ValueError("NaN in expert 1"), False),
    (NotImplementedError('"aminmax_cpu" not implemented'), False), (TypeError("bad"), False), (KeyError("w"), False),
])
def test_only_trouble_a_retry_can_clear_is_retried(error, retried):
    from prefect.states import Failed

    from flows.merge_flow import _transient

    assert _transient(None, None, Failed(data=error)) is retried


def test_plan_notes_a_tokenizer_only_an_expert_has(tmp_path, capsys):
    base, experts = tiny_llama_zoo(tmp_path / "zoo", n_experts=3, layers=1)
    (experts[1] / "tokenizer.json").write_text("{}")
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts])
    assert cli(["plan", str(recipe), "--output", str(tmp_path / "m"), "--json"]) == 0
    [note] = json.loads(capsys.readouterr().out)["notes"]
    assert f"{base} has no tokenizer files" in note and f"{experts[1]} has tokenizer.json" in note
    (base / "tokenizer.json").write_text("{}")
    assert cli(["plan", str(recipe), "--output", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []


def test_local_merges_do_not_load_boto3(zoo, tmp_path):
    """boto3 loads on the first S3 call: a plan (and merge) of local files never pays its
    0.2-0.3 s import."""
    from tests.test_cli import modules_loaded_by

    base, experts = zoo
    recipe = write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts])
    argv = ["plan", str(recipe), "--output", str(tmp_path / "m")]
    assert modules_loaded_by(argv, ("boto3", "botocore.session", "s3transfer"),
                             also_import=("flows.merge_flow", "flows.unit")) == []


def test_models_from_recipe_merges_the_selected_experts(prefect_api, zoo, tmp_path):
    import shutil

    base, experts = zoo
    landed = tmp_path / "experts"
    for e in experts:
        shutil.copytree(e, landed / e.name)
        (landed / e.name / storage.COMPLETE_MARKER).write_text("{}")
    shutil.copytree(experts[0], landed / "half-uploaded")  # no marker: never selected
    text = (f"name: auto\nmerge_method: ties\nbase_model: {base}\nmodels_from: {{uri: {landed}, pattern: 'expert-*'}}\n"
            "parameters: {density: 0.4}\ndtype: bfloat16\n")
    summary = run_merge(parse_recipe(text, output=str(tmp_path / "merged")), catalog_path=str(tmp_path / "c.duckdb"))
    [run] = Catalog(tmp_path / "c.duckdb").runs()
    assert [i["uri"].rsplit("/", 1)[-1] for i in run["inputs"]] == ["expert-0", "expert-1", "expert-2"]
    got, _ = load_output(summary["output"], tmp_path, None)
    explicit = MERGEKIT_TIES.replace("density: 0.6", "density: 0.4").replace("weight: 0.5", "weight: 1.0").replace(
        "weight: 0.7", "weight: 1.0").replace("  normalize: true\n  int8_mask: true\n", "  normalize: true\n")
    assert_same(got, expected_merge(zoo, explicit))


def wait_for_log(caplog, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not any(text in r.getMessage() for r in caplog.records):
        time.sleep(0.1)
    assert any(text in r.getMessage() for r in caplog.records), f"no log line with {text!r}"


def test_a_second_run_of_an_output_waits_for_the_first(prefect_api, zoo, tmp_path, caplog):
    """While another merge holds the output (a nightly run, say), this run waits and stages
    nothing; once the output is free it merges and publishes as usual."""
    import threading

    base, experts = zoo
    output = tmp_path / "merged"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts]), output=str(output))
    holder = storage.OutputLock(str(output), purpose="the other run").acquire()
    summary: dict = {}
    run = threading.Thread(target=lambda: summary.update(run_merge(recipe, catalog_path=str(tmp_path / "c.duckdb"))))
    run.start()
    try:
        wait_for_log(caplog, "another merge holds it")
        time.sleep(1.0)  # past the lock, a unit would be staged by now
        assert run.is_alive()
        assert not list(Path(storage.staging_uri(str(output))).glob("*.safetensors")) and not output.exists()
        # recorded only once it holds the lock: a run killed while waiting leaves no 'running' row
        assert not (tmp_path / "c.duckdb").exists() or not Catalog(tmp_path / "c.duckdb").runs()
    finally:
        holder.release()
    run.join(120)
    assert summary["timings"]["lock_wait"] > 1.0
    got, _ = load_output(summary["output"], tmp_path, None)
    assert_same(got, expected_merge(zoo, MERGEKIT_TIES))


def test_a_model_another_recipe_published_while_this_run_waited_is_not_replaced(prefect_api, zoo, tmp_path, caplog):
    import threading

    base, experts = zoo
    output = tmp_path / "merged"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts]), output=str(output))
    holder = storage.OutputLock(str(output), purpose="the other run").acquire()
    errors: list[Exception] = []

    def merge():
        try:
            run_merge(recipe, catalog_path=str(tmp_path / "c.duckdb"))
        except Exception as exc:  # noqa: BLE001 - handed to the test's thread
            errors.append(exc)

    run = threading.Thread(target=merge)
    run.start()
    try:
        wait_for_log(caplog, "another merge holds it")
        output.mkdir()  # what the holder publishes: recipe 'other''s model
        (output / storage.SIDECAR_NAME).write_text(json.dumps({"recipe": {"name": "other"}}))
    finally:
        holder.release()
    run.join(120)
    assert errors and "holds the model of recipe 'other'" in str(errors[0])
    assert sorted(p.name for p in output.iterdir()) == [storage.SIDECAR_NAME]


def test_a_run_that_cannot_get_its_output_fails_and_leaves_the_holders_staging(prefect_api, zoo, tmp_path,
                                                                               monkeypatch):
    base, experts = zoo
    output = tmp_path / "merged"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(base), [str(e) for e in experts]), output=str(output))
    monkeypatch.setenv("MERGELINE_LOCK_WAIT_S", "0.5")
    holder = storage.OutputLock(str(output), purpose="the other run").acquire()
    try:
        theirs = Path(storage.staging_uri(str(output))) / "model-00001-of-00006.safetensors"
        theirs.parent.mkdir(parents=True)
        theirs.write_bytes(b"the other run's shard")
        with pytest.raises(storage.StorageError, match="being written by another merge.*the other run"):
            run_merge(recipe, catalog_path=str(tmp_path / "c.duckdb"))
        assert theirs.read_bytes() == b"the other run's shard"
        [failed] = Catalog(tmp_path / "c.duckdb").runs()
        assert failed["status"] == "failed" and "being written by another merge" in failed["error"]
    finally:
        holder.release()
