"""The catalog's API, CLI, schema migration and export (concurrency is in test_catalog_concurrency.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import boto3
import duckdb
import pytest

from flows.cli import main
from storage.catalog import SCHEMA_VERSION, Catalog, CatalogError, default_catalog_path
from storage.version import code_version


def _reg(cat, name, kind, **kw):
    return cat.register_checkpoint(f"s3://models/{name}", kind=kind, name=name, identity=f"id-{name}", **kw)


def _start(cat, name, method, inputs, weights, base=None, **kw):
    return cat.start_run(
        recipe_name=name, method=method, parameters=kw.pop("parameters", {}), recipe_text=f"name: {name}\n",
        base_id=base, code_version="mergeline test", flow_run_id=f"flow-{name}",
        inputs=[{"checkpoint_id": i, "weight": w, "parameters": kw.get("per_model", {})}
                for i, w in zip(inputs, weights)],
    )


def build_zoo(cat) -> dict:
    """base + experts a..d; m1 = ties(base; a, b); m2 = linear(m1, c); m3 = task_arithmetic(base; m2, m1, d)."""
    ids = {"base": _reg(cat, "base", "base", model_type="llama", param_count=7_000_000, dtype="bfloat16")}
    for e in "abcd":
        ids[e] = _reg(cat, f"expert-{e}", "expert", tags=[f"task-{e}"])
    run = _start(cat, "m1", "ties", [ids["a"], ids["b"]], [0.5, 0.5], base=ids["base"],
                 parameters={"density": 0.5}, per_model={"density": 0.4})
    ids["m1"] = cat.complete_run(run, "s3://models/m1", name="m1", identity="id-m1", timings={"merge": 1.5})
    run = _start(cat, "m2", "linear", [ids["m1"], ids["c"]], [0.7, 0.3])
    ids["m2"] = _reg(cat, "m2", "merged")  # the two-step path the flow uses
    cat.finish_run(run, status="succeeded", output_checkpoint_id=ids["m2"])
    run = _start(cat, "m3", "task_arithmetic", [ids["m2"], ids["m1"], ids["d"]], [0.4, 0.3, 0.3], base=ids["base"])
    ids["m3"] = cat.complete_run(run, "s3://models/m3", name="m3", identity="id-m3")
    ids["failed_run"] = _start(cat, "m4", "linear", [ids["m3"], ids["a"]], [0.5, 0.5])
    cat.finish_run(ids["failed_run"], status="failed", error="OutOfMemoryError: CUDA")
    for name, value in [("m1", 0.6), ("m2", 0.7), ("m3", 0.8), ("a", 0.9)]:
        cat.record_evaluation(checkpoint_id=ids[name], suite="core", task="qa", split="held_in",
                              metric="exact_match", value=value, normalized_value=value / 0.9,
                              normalized_against="expert-a", num_examples=100, data_digest="sha256:qa")
    for name, value in [("m1", 12.0), ("m3", 9.5), ("base", 15.0)]:
        cat.record_evaluation(checkpoint_id=ids[name], suite="core", task="wiki", split="held-out",
                              metric="perplexity", value=value, num_examples=50)
    return ids


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cat = Catalog(tmp_path_factory.mktemp("zoo") / "catalog.duckdb")
    return cat, build_zoo(cat)


@pytest.fixture
def cat(tmp_path):
    return Catalog(tmp_path / "catalog.duckdb")


def _labels(rows):
    return [r["label"] for r in rows]


# -- lineage, derived-from, best ------------------------------------------------------------------


def test_lineage_three_merges_deep_with_a_reused_merged_input(zoo):
    cat, ids = zoo
    tree = cat.lineage("m3")
    assert tree["id"] == ids["m3"] and tree["run"]["method"] == "task_arithmetic"
    assert tree["run"]["base"]["label"] == "base@v1" and tree["run"]["base"]["run"] is None
    top = tree["run"]["inputs"]
    assert [(i["position"], i["model"]["label"], i["weight"]) for i in top] == [
        (0, "m2@v1", 0.4), (1, "m1@v1", 0.3), (2, "expert-d@v1", 0.3)]
    m2 = top[0]["model"]["run"]
    assert m2["method"] == "linear" and m2["base"] is None
    assert [(i["model"]["label"], i["weight"]) for i in m2["inputs"]] == [("m1@v1", 0.7), ("expert-c@v1", 0.3)]
    for m1 in (m2["inputs"][0]["model"], top[1]["model"]):  # m1 appears twice, each with its full history
        assert m1["run"]["method"] == "ties" and m1["run"]["parameters"] == {"density": 0.5}
        assert m1["run"]["base"]["id"] == ids["base"]
        assert [(i["model"]["label"], i["weight"], i["parameters"]) for i in m1["run"]["inputs"]] == [
            ("expert-a@v1", 0.5, {"density": 0.4}), ("expert-b@v1", 0.5, {"density": 0.4})]
        assert all(i["model"]["run"] is None for i in m1["run"]["inputs"])

    def depth(node):
        run = node["run"]
        return 0 if run is None else 1 + max(depth(i["model"]) for i in run["inputs"])

    assert depth(tree) == 3
    assert cat.lineage("expert-a")["run"] is None
    json.dumps(tree)  # plain data all the way down


def test_derived_from_follows_inputs_and_bases_transitively(zoo):
    cat, ids = zoo
    derived = cat.derived_from("expert-a")
    assert {d["label"]: d["generation"] for d in derived} == {"m1@v1": 1, "m2@v1": 2, "m3@v1": 2}
    assert {d["label"]: d["generation"] for d in cat.derived_from(ids["c"])} == {"m2@v1": 1, "m3@v1": 2}
    assert {d["label"]: d["generation"] for d in cat.derived_from("base")} == {"m1@v1": 1, "m3@v1": 1, "m2@v1": 2}
    assert _labels(cat.derived_from("expert-d")) == ["m3@v1"]
    assert cat.derived_from("m3") == []  # m4's run failed: nothing was made from m3
    assert {d["method"] for d in derived} == {"ties", "linear", "task_arithmetic"}


def test_derived_from_a_name_or_uri_covers_every_version_of_it(cat):
    """An expert re-uploaded (v2) after a model was made from v1: asking by name or URI still
    finds that model; name@vN and ids mean one version."""
    base = _reg(cat, "base", "base")
    v1 = _reg(cat, "math", "expert")
    run = _start(cat, "old", "task_arithmetic", [v1], [1.0], base=base)
    cat.complete_run(run, "s3://models/old", name="old", identity="id-old")
    v2 = cat.register_checkpoint("s3://models/math", kind="expert", name="math", identity="id-math-2")
    run = _start(cat, "new", "task_arithmetic", [v2], [1.0], base=base)
    cat.complete_run(run, "s3://models/new", name="new", identity="id-new")
    run = _start(cat, "both", "linear", [v1, v2], [0.5, 0.5])  # made from both versions: listed once
    cat.complete_run(run, "s3://models/both", name="both", identity="id-both")
    for ref in ("math", "s3://models/math"):
        assert sorted(_labels(cat.derived_from(ref))) == ["both@v1", "new@v1", "old@v1"], ref
    for ref in ("math@v1", v1):
        assert sorted(_labels(cat.derived_from(ref))) == ["both@v1", "old@v1"], ref
    assert sorted(_labels(cat.derived_from("math@v2"))) == ["both@v1", "new@v1"]
    assert cat.find_checkpoint("math")["id"] == v2 and cat.lineage("math")["id"] == v2  # one model: the latest


def test_best_ranks_latest_scores_in_the_metric_direction(zoo, tmp_path):
    cat, ids = zoo
    assert [(r["rank"], r["label"]) for r in cat.best("qa")] == [
        (1, "expert-a@v1"), (2, "m3@v1"), (3, "m2@v1"), (4, "m1@v1")]
    assert [r["label"] for r in cat.best("wiki", split="held-out")] == ["m3@v1", "m1@v1", "base@v1"]  # lower ppl
    assert cat.best("qa", metric="exact_match", split="held-in")[0]["normalized_against"] == "expert-a"
    with pytest.raises(CatalogError, match="no evaluations"):
        cat.best("qa", split="held-out")
    with pytest.raises(CatalogError, match="no scores for metric"):
        cat.best("qa", metric="f1")

    fresh = Catalog(tmp_path / "c.duckdb")
    x, y = _reg(fresh, "x", "expert"), _reg(fresh, "y", "expert")
    for ck, value in [(x, 0.9), (y, 0.5), (x, 0.1)]:  # x re-evaluated: its latest score counts
        fresh.record_evaluation(checkpoint_id=ck, suite="s", task="t", split="held-in", metric="acc", value=value)
    assert [(r["label"], r["value"]) for r in fresh.best("t")] == [("y@v1", 0.5), ("x@v1", 0.1)]
    fresh.record_evaluation(checkpoint_id=x, suite="s", task="t", split="held-in", metric="loss", value=1.0)
    with pytest.raises(CatalogError, match="several metrics"):
        fresh.best("t")


def test_list_and_show(zoo):
    cat, ids = zoo
    models = cat.list_models()
    assert len(models) == 8 and models[0]["label"] == "m3@v1"  # newest first
    m1 = next(m for m in models if m["label"] == "m1@v1")
    assert {(s["task"], s["metric"], s["value"]) for s in m1["scores"]} == {("qa", "exact_match", 0.6),
                                                                          ("wiki", "perplexity", 12.0)}
    shown = cat.show("m1")
    assert shown["produced_by"]["method"] == "ties" and shown["produced_by"]["timings"] == {"merge": 1.5}
    assert {r["recipe_name"] for r in shown["used_by"]} == {"m2", "m3"}
    assert _labels(cat.show("expert-a")["used_by"][0]["inputs"]) == ["m3@v1", "expert-a@v1"]  # failed m4 run
    json.dumps(shown)


def test_runs_newest_first_and_filtered(zoo):
    cat, ids = zoo
    assert [r["recipe_name"] for r in cat.runs()] == ["m4", "m3", "m2", "m1"]
    failed = cat.runs(status="failed")
    assert [(r["id"], r["error"], r["output_id"]) for r in failed] == [
        (ids["failed_run"], "OutOfMemoryError: CUDA", None)]
    assert len(cat.runs(limit=2)) == 2
    with pytest.raises(CatalogError, match="unknown run status"):
        cat.runs(status="crashed")


# -- registration and runs ------------------------------------------------------------------------


def test_registration_is_idempotent_and_versioned(cat):
    first = cat.register_checkpoint("s3://b/m/", kind="expert", name="m", identity="etag-1", dtype="float16")
    assert cat.register_checkpoint("s3://b/m", kind="expert", name="m", identity="etag-1") == first
    second = cat.register_checkpoint("s3://b/m", kind="expert", name="m", identity="etag-2")
    assert second != first
    rows = cat.sql("SELECT id, version, identity, dtype FROM checkpoints ORDER BY version")
    assert rows == [{"id": first, "version": 1, "identity": "etag-1", "dtype": "float16"},
                    {"id": second, "version": 2, "identity": "etag-2", "dtype": None}]  # v1 kept as it was
    assert cat.find_checkpoint("m")["id"] == second
    assert cat.find_checkpoint("m@v1")["id"] == first
    assert cat.find_checkpoint("s3://b/m")["id"] == second
    assert cat.find_checkpoint(first)["identity"] == "etag-1"
    assert cat.find_checkpoint("m@v3") is None
    with pytest.raises(CatalogError, match="kind"):
        cat.register_checkpoint("s3://b/n", kind="student", name="n", identity="x")


def test_failed_run_leaves_no_checkpoint(cat):
    a, b = _reg(cat, "a", "expert"), _reg(cat, "b", "expert")
    before = cat.sql("SELECT count(*) AS n FROM checkpoints")
    run = _start(cat, "m", "linear", [a, b], [0.5, 0.5])
    assert cat.runs()[0]["status"] == "running"
    with pytest.raises(CatalogError, match="needs its output"):
        cat.finish_run(run, status="succeeded")
    with pytest.raises(CatalogError, match="no output"):
        cat.finish_run(run, status="failed", output_checkpoint_id=a)
    with pytest.raises(CatalogError, match="not a merged model"):
        cat.finish_run(run, status="succeeded", output_checkpoint_id=a)
    cat.finish_run(run, status="failed", error="boom", timings={"plan": 0.1})
    assert cat.sql("SELECT count(*) AS n FROM checkpoints") == before
    (failed,) = cat.runs(status="failed")
    assert (failed["output_id"], failed["error"], failed["timings"]) == (None, "boom", {"plan": 0.1})
    assert failed["ended_at"] is not None
    with pytest.raises(CatalogError, match="already finished"):
        cat.finish_run(run, status="failed")
    # complete_run registers and finishes in one transaction: refused here, so nothing is registered
    with pytest.raises(CatalogError, match="already finished"):
        cat.complete_run(run, "s3://models/m", name="m", identity="id-m")
    assert cat.find_checkpoint("s3://models/m") is None


def test_run_with_no_inputs_can_only_fail(cat):
    """A merge whose inputs could not be opened is still on record, as a failed run."""
    run = _start(cat, "m", "ties", [], [])
    merged = cat.register_checkpoint("s3://models/m", kind="merged", name="m", identity="id-m")
    with pytest.raises(CatalogError, match="no inputs can only fail"):
        cat.finish_run(run, status="succeeded", output_checkpoint_id=merged)
    cat.finish_run(run, status="failed", error="cannot read the inputs")
    (failed,) = cat.runs(status="failed")
    assert failed["inputs"] == [] and failed["error"] == "cannot read the inputs"


def test_run_inputs_must_exist_and_vocabularies_are_checked(cat):
    a = _reg(cat, "a", "expert")
    with pytest.raises(CatalogError, match="no checkpoint 'ghost'"):
        _start(cat, "m", "linear", [a, "ghost"], [0.5, 0.5])
    assert cat.runs() == [] and cat.sql("SELECT * FROM run_inputs") == []  # nothing half-written
    run = cat.start_run(recipe_name="m", method="linear", parameters={}, recipe_text="", base_id=None,
                        inputs=[{"checkpoint_id": a}], flow_run_id=None)
    assert cat.runs()[0]["code_version"] == code_version() and cat.runs()[0]["id"] == run
    with pytest.raises(CatalogError, match="trigger"):
        cat.start_run(recipe_name="m", method="linear", parameters={}, recipe_text="", base_id=None,
                      inputs=[{"checkpoint_id": a}], code_version="v", flow_run_id=None, trigger="cron")
    with pytest.raises(CatalogError, match="split"):
        cat.record_evaluation(checkpoint_id=a, suite="s", task="t", split="train", metric="acc", value=1)
    with pytest.raises(CatalogError, match="finite"):
        cat.record_evaluation(checkpoint_id=a, suite="s", task="t", split="held-in", metric="acc", value=float("nan"))
    score = {"checkpoint_id": a, "suite": "s", "task": "t", "split": "held_out", "metric": "acc", "value": 0.5}
    with pytest.raises(CatalogError, match="no checkpoint 'ghost'"):
        cat.record_evaluations([score, {**score, "checkpoint_id": "ghost"}])
    assert cat.sql("SELECT count(*) AS n FROM evaluations") == [{"n": 0}]  # all or nothing
    cat.record_evaluations([score, {**score, "value": 0.25}])
    assert [(r["split"], r["value"]) for r in cat.best("t")] == [("held-out", 0.25)]  # later in a batch wins


def test_last_successful_run_carries_input_identities(cat):
    base, a = _reg(cat, "base", "base"), _reg(cat, "a", "expert")
    old = _start(cat, "nightly", "ties", [a], [1.0], base=base)
    cat.complete_run(old, "s3://out/v1", name="nightly", identity="o1")
    a2 = cat.register_checkpoint("s3://models/a", kind="expert", name="a", identity="id-a-retrained")
    new = _start(cat, "nightly", "ties", [a2], [1.0], base=base)
    cat.complete_run(new, "s3://out/v2", name="nightly", identity="o2")
    cat.finish_run(_start(cat, "nightly", "ties", [a2], [1.0], base=base), status="failed", error="x")
    last = cat.last_successful_run("nightly")
    assert last["id"] == new and last["base_identity"] == "id-base" and last["output_identity"] == "o2"
    assert [(i["uri"], i["identity"]) for i in last["inputs"]] == [("s3://models/a", "id-a-retrained")]
    assert cat.find_checkpoint("nightly")["version"] == 2
    assert cat.last_successful_run("other") is None


def test_sql_refuses_writes(zoo, tmp_path):
    cat, _ = zoo
    before = cat.sql("SELECT (SELECT count(*) FROM checkpoints) AS c, (SELECT count(*) FROM runs) AS r")
    target = tmp_path / "leak.csv"
    for query in ["INSERT INTO runs (id) VALUES ('x')", "DELETE FROM checkpoints", "UPDATE runs SET status = 'failed'",
                  "DROP TABLE evaluations", "CREATE TABLE t (a INT)", "SELECT 1; DELETE FROM runs",
                  f"COPY checkpoints TO '{target}'", f"ATTACH '{tmp_path / 'other.duckdb'}' AS other"]:
        with pytest.raises(CatalogError, match="read-only"):
            cat.sql(query)
    assert not target.exists()
    assert cat.sql("SELECT (SELECT count(*) FROM checkpoints) AS c, (SELECT count(*) FROM runs) AS r") == before
    assert cat.sql("SELECT 1 AS id, 2 AS id") == [{"id": 1, "id_2": 2}]
    with pytest.raises(CatalogError, match="^sql: "):
        cat.sql("SELEC 1")


# -- schema migration -----------------------------------------------------------------------------

# The v1 DDL as it shipped, copied here on purpose: the test must not follow later edits to the code.
V1_DDL = """
CREATE TABLE schema_version (
    version INTEGER PRIMARY KEY, description VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL);
CREATE TABLE checkpoints (
    id VARCHAR PRIMARY KEY, uri VARCHAR NOT NULL,
    kind VARCHAR NOT NULL CHECK (kind IN ('base', 'expert', 'merged')),
    name VARCHAR NOT NULL, version INTEGER NOT NULL, identity VARCHAR NOT NULL,
    model_type VARCHAR, param_count BIGINT, dtype VARCHAR,
    tags VARCHAR[] NOT NULL DEFAULT [], metadata JSON, registered_at TIMESTAMP NOT NULL,
    UNIQUE (uri, identity), UNIQUE (name, version));
CREATE TABLE runs (
    id VARCHAR PRIMARY KEY, recipe_name VARCHAR NOT NULL, method VARCHAR NOT NULL,
    parameters JSON, recipe_text VARCHAR, recipe_digest VARCHAR, base_id VARCHAR, output_id VARCHAR,
    code_version VARCHAR, flow_run_id VARCHAR, trigger VARCHAR NOT NULL,
    status VARCHAR NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'skipped')),
    error VARCHAR, started_at TIMESTAMP NOT NULL, ended_at TIMESTAMP);
CREATE TABLE run_inputs (
    run_id VARCHAR NOT NULL, position INTEGER NOT NULL, checkpoint_id VARCHAR NOT NULL,
    weight DOUBLE, parameters JSON, PRIMARY KEY (run_id, position));
CREATE TABLE evaluations (
    id VARCHAR PRIMARY KEY, checkpoint_id VARCHAR NOT NULL, suite VARCHAR NOT NULL,
    task VARCHAR NOT NULL, split VARCHAR NOT NULL, metric VARCHAR NOT NULL, value DOUBLE NOT NULL,
    normalized_value DOUBLE, normalized_against VARCHAR, num_examples INTEGER, data_digest VARCHAR,
    flow_run_id VARCHAR, recorded_at TIMESTAMP NOT NULL);
INSERT INTO schema_version VALUES (1, 'initial', TIMESTAMP '2026-01-01 00:00:00');
INSERT INTO checkpoints VALUES
    ('ck-a', 's3://m/a', 'expert', 'a', 1, 'ia', 'llama', 100, 'bfloat16', ['math'], '{"src": "hub"}',
     TIMESTAMP '2026-01-01 00:00:01'),
    ('ck-b', 's3://m/b', 'expert', 'b', 1, 'ib', 'llama', 100, 'bfloat16', [], NULL, TIMESTAMP '2026-01-01 00:00:02'),
    ('ck-m', 's3://m/m', 'merged', 'm', 1, 'im', 'llama', 100, 'bfloat16', [], NULL, TIMESTAMP '2026-01-01 00:00:03');
INSERT INTO runs VALUES ('run-1', 'm', 'ties', '{"density": 0.5}', 'name: m', 'd1', NULL, 'ck-m', 'mergeline 0.0.1',
    'flow-1', 'manual', 'succeeded', NULL, TIMESTAMP '2026-01-01 00:00:02', TIMESTAMP '2026-01-01 00:00:03');
INSERT INTO run_inputs VALUES ('run-1', 0, 'ck-a', 0.6, '{}'), ('run-1', 1, 'ck-b', 0.4, '{}');
INSERT INTO evaluations VALUES
    ('ev-1', 'ck-m', 'core', 'wiki', 'held-out', 'perplexity', 9.0, NULL, NULL, 10, NULL, NULL, TIMESTAMP '2026-01-02'),
    ('ev-2', 'ck-a', 'core', 'wiki', 'held-out', 'perplexity', 11.0, NULL, NULL, 10, NULL, NULL, TIMESTAMP '2026-01-02'),
    ('ev-3', 'ck-m', 'core', 'qa', 'held-in', 'exact_match', 0.7, 0.9, 'a', 10, NULL, NULL, TIMESTAMP '2026-01-02');
"""


def test_v1_catalog_is_migrated_in_place_with_its_data(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(V1_DDL)
    con.close()

    cat = Catalog(path)
    versions = cat.sql("SELECT version FROM schema_version ORDER BY version")
    assert [v["version"] for v in versions] == list(range(1, SCHEMA_VERSION + 1))
    assert cat.find_checkpoint("a")["metadata"] == {"src": "hub"} and cat.find_checkpoint("a")["tags"] == ["math"]
    assert [(i["model"]["label"], i["weight"]) for i in cat.lineage("m")["run"]["inputs"]] == [
        ("a@v1", 0.6), ("b@v1", 0.4)]
    assert cat.runs()[0]["timings"] is None  # new column, present and empty for old rows
    assert cat.sql("SELECT count(*) AS n FROM checkpoints WHERE seen_at IS DISTINCT FROM registered_at") == [{"n": 0}]
    assert [(r["target_uri"], r["writing_since"]) for r in cat.runs()] == [(cat.find_checkpoint("m")["uri"], None)]
    backfilled = cat.sql("SELECT id, higher_is_better FROM evaluations ORDER BY id")
    assert backfilled == [{"id": "ev-1", "higher_is_better": False}, {"id": "ev-2", "higher_is_better": False},
                          {"id": "ev-3", "higher_is_better": True}]
    assert _labels(cat.best("wiki")) == ["m@v1", "a@v1"]  # lower perplexity first
    new = cat.register_checkpoint("s3://m/a", kind="expert", name="a", identity="ia2")
    assert cat.find_checkpoint(new)["version"] == 2
    Catalog(path)  # reopening applies nothing twice
    assert len(cat.sql("SELECT * FROM schema_version")) == SCHEMA_VERSION


def test_catalog_from_a_newer_mergeline_is_refused(tmp_path):
    path = tmp_path / "c.duckdb"
    Catalog(path)
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO schema_version VALUES (99, 'future', now()::TIMESTAMP)")
    con.close()
    with pytest.raises(ValueError, match="newer"):
        Catalog(path)


def test_default_path_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGELINE_CATALOG", str(tmp_path / "x.duckdb"))
    assert default_catalog_path() == tmp_path / "x.duckdb"
    monkeypatch.delenv("MERGELINE_CATALOG")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_catalog_path() == tmp_path / "data" / "mergeline" / "catalog.duckdb"
    assert Catalog().path == default_catalog_path() and default_catalog_path().exists()


# -- export ---------------------------------------------------------------------------------------

TABLES = ["checkpoints", "evaluations", "run_inputs", "runs", "schema_version"]


def _counts(cat):
    return {t: cat.sql(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}


def _parquet_counts(files):
    con = duckdb.connect()
    return {f.rsplit("/", 1)[-1].removesuffix(".parquet"):
            con.execute("SELECT count(*) FROM read_parquet(?)", [str(f)]).fetchone()[0] for f in files}


def test_export_to_local_parquet(zoo, tmp_path):
    cat, ids = zoo
    files = cat.export(str(tmp_path / "out"))
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == [f"{t}.parquet" for t in TABLES]
    assert _parquet_counts(files) == _counts(cat)
    con = duckdb.connect()
    weights = con.execute(
        "SELECT list(weight ORDER BY position) FROM read_parquet(?) WHERE run_id = (SELECT id FROM read_parquet(?) "
        "WHERE recipe_name = 'm3')", [str(tmp_path / "out" / "run_inputs.parquet"), str(tmp_path / "out" / "runs.parquet")],
    ).fetchone()[0]
    assert weights == [0.4, 0.3, 0.3]


def test_export_to_s3(zoo, bucket, tmp_path):
    cat, ids = zoo
    uris = cat.export(f"s3://{bucket}/exports/today/")
    assert sorted(uris) == [f"s3://{bucket}/exports/today/{t}.parquet" for t in TABLES]
    s3 = boto3.client("s3")
    local = []
    for t in TABLES:
        local.append(str(tmp_path / f"{t}.parquet"))
        s3.download_file(bucket, f"exports/today/{t}.parquet", local[-1])
    assert _parquet_counts(local) == _counts(cat)


# -- CLI ------------------------------------------------------------------------------------------


def _cli(capsys, zoo_cat, *args):
    code = main(["catalog", *args, "--catalog", str(zoo_cat.path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_help_shows_the_catalog_location(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MERGELINE_CATALOG", str(tmp_path / "where.duckdb"))
    with pytest.raises(SystemExit) as exit_:
        main(["catalog", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"catalog: {tmp_path / 'where.duckdb'} ($MERGELINE_CATALOG)" in out


def test_cli_tables_and_json(zoo, capsys):
    cat, ids = zoo
    code, out, _ = _cli(capsys, cat, "list")
    assert code == 0 and all(f"{n}@v1" in out for n in ("m1", "m2", "m3", "expert-a", "base"))
    code, out, _ = _cli(capsys, cat, "list", "--json")
    assert {m["label"] for m in json.loads(out)} == {m["label"] for m in cat.list_models()}

    code, out, _ = _cli(capsys, cat, "lineage", "m3")
    assert code == 0 and "task_arithmetic" in out and "input 1 weight 0.3: m1@v1" in out and out.count("ties") == 2
    code, out, _ = _cli(capsys, cat, "lineage", "m3", "--json")
    assert json.loads(out) == json.loads(json.dumps(cat.lineage("m3")))

    code, out, _ = _cli(capsys, cat, "derived-from", "expert-c", "--json")
    assert _labels(json.loads(out)) == ["m2@v1", "m3@v1"]
    code, out, _ = _cli(capsys, cat, "best", "--task", "wiki", "--split", "held-out")
    assert code == 0 and "lower is better" in out and out.index("m3@v1") < out.index("base@v1")
    code, out, _ = _cli(capsys, cat, "runs", "--status", "failed", "--json")
    assert [r["error"] for r in json.loads(out)] == ["OutOfMemoryError: CUDA"]
    code, out, _ = _cli(capsys, cat, "runs")
    assert code == 0 and out.index("m4") < out.index("m1")
    code, out, _ = _cli(capsys, cat, "show", "m2", "--json")
    assert json.loads(out)["produced_by"]["method"] == "linear"
    code, out, _ = _cli(capsys, cat, "sql", "SELECT name FROM checkpoints WHERE kind = 'merged' ORDER BY name", "--json")
    assert json.loads(out) == [{"name": "m1"}, {"name": "m2"}, {"name": "m3"}]


def test_cli_errors_are_one_line(zoo, capsys, tmp_path):
    cat, _ = zoo
    code, out, err = _cli(capsys, cat, "sql", "DELETE FROM runs")
    assert code == 2 and err.count("\n") == 1 and "read-only" in err
    code, out, err = _cli(capsys, cat, "show", "nope")
    assert code == 2 and err.startswith("mergeline: error: no checkpoint 'nope'") and "hint:" in err
    code, out, err = _cli(capsys, cat, "best", "--task", "nope")
    assert code == 2 and "no evaluations of task 'nope'" in err
    with pytest.raises(SystemExit) as usage:  # argparse: a usage error, not a DuckDB traceback
        main(["catalog", "runs", "--catalog", str(cat.path), "--limit", "-1"])
    assert usage.value.code == 2 and "--limit: expected a whole number of at least 1" in capsys.readouterr().err
    missing = tmp_path / "none.duckdb"
    assert main(["catalog", "list", "--catalog", str(missing)]) == 2
    assert "no catalog at" in capsys.readouterr().err and not missing.exists()


def test_cli_options_before_subcommand_and_env(zoo, capsys, monkeypatch, tmp_path):
    cat, _ = zoo
    assert main(["catalog", "--catalog", str(cat.path), "--json", "runs", "--limit", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    monkeypatch.setenv("MERGELINE_CATALOG", str(cat.path))
    assert main(["catalog", "export", str(tmp_path / "x"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(TABLES)


def test_times_are_utc_iso(zoo):
    cat, _ = zoo
    stamp = datetime.fromisoformat(cat.runs()[0]["started_at"])
    assert abs((datetime.now(UTC).replace(tzinfo=None) - stamp).total_seconds()) < 600


# -- docs -----------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "catalog.md"


def test_docs_describe_every_column_and_their_queries_run(zoo):
    cat, _ = zoo
    text = DOCS.read_text()
    columns = cat.sql("SELECT table_name, column_name FROM information_schema.columns "
                      "WHERE table_catalog = current_database()")
    assert {c["table_name"] for c in columns} >= set(TABLES) | {"producers", "model_edges", "latest_scores"}
    missing = [f"{c['table_name']}.{c['column_name']}" for c in columns
               if f"`{c['table_name']}`" not in text or f"`{c['column_name']}`" not in text]
    assert missing == []
    block = text.split("```sql", 1)[1].split("```", 1)[0]
    queries = [q.strip() for q in block.split(";") if q.strip()]
    assert len(queries) == 3
    for q in queries:
        cat.sql(q)
    ancestors = cat.sql(queries[0].replace("'math-code' AND version = 3", "'m3' AND version = 1"))
    assert {a["name"]: a["depth"] for a in ancestors}["expert-a"] == 2


def test_inputs_in_different_folders_with_one_name_are_different_models(cat):
    """Two folders called expert-0 (two zoos) are two models, not two versions of one: asking for
    what was derived from the first must not list what was made from the second."""
    base = cat.register_checkpoint("s3://m/base", kind="base", name="base", identity="b")
    big = cat.register_checkpoint("s3://m/zoo_big/expert-0", kind="expert", name="expert-0", identity="big")
    small = cat.register_checkpoint("s3://m/zoo_small/expert-0", kind="expert", name="expert-0", identity="small")
    small2 = cat.register_checkpoint("s3://m/zoo_small/expert-0", kind="expert", name="expert-0", identity="small-2")
    assert [cat.find_checkpoint(c)["label"] for c in (big, small, small2)] == [
        "expert-0@v1", "zoo_small/expert-0@v1", "zoo_small/expert-0@v2"]
    run = _start(cat, "from-small", "task_arithmetic", [small2], [1.0], base=base)
    cat.complete_run(run, "s3://m/out", name="from-small", identity="o")
    assert cat.derived_from("expert-0") == []
    assert _labels(cat.derived_from("zoo_small/expert-0")) == ["from-small@v1"]


def test_content_reverted_to_an_earlier_version_is_the_latest_again(cat):
    v1 = cat.register_checkpoint("s3://m/math", kind="expert", name="math", identity="one")
    v2 = cat.register_checkpoint("s3://m/math", kind="expert", name="math", identity="two")
    assert cat.find_checkpoint("math")["id"] == v2
    assert cat.register_checkpoint("s3://m/math", kind="expert", name="math", identity="one") == v1
    assert cat.find_checkpoint("math")["id"] == v1 and cat.find_checkpoint("s3://m/math")["id"] == v1
    assert cat.find_checkpoint("math")["version"] == 1 and cat.find_checkpoint("math@v2")["id"] == v2


def test_taking_an_output_over_fails_its_dead_writers_but_not_runs_waiting_for_it(cat):
    base = _reg(cat, "base", "base")
    expert = _reg(cat, "math", "expert")

    def start(name: str, target: str = "s3://m/out") -> str:
        return cat.start_run(recipe_name=name, method="linear", parameters={}, recipe_text=name, base_id=base,
                             inputs=[{"checkpoint_id": expert, "weight": 1.0}], target_uri=target)

    dead, waiting, elsewhere, taker = start("dead"), start("waiting"), start("other", "s3://m/other"), start("taker")
    cat.begin_writing(dead)
    cat.begin_writing(elsewhere)
    assert cat.begin_writing(taker) == [dead]
    status = {r["id"]: (r["status"], r["error"]) for r in cat.runs()}
    assert status[dead][0] == "failed" and taker in status[dead][1]
    assert status[waiting] == status[elsewhere] == status[taker] == ("running", None)
    with pytest.raises(CatalogError, match="no running merge run"):
        cat.begin_writing(dead)


def test_the_base_of_a_model_made_again_from_a_recipe_naming_it_is_found(tmp_path):
    """linear ignores its base, so the same bytes come out with or without one: the second run's
    base is what `mergeline eval` normalises held-out tasks by, though the first run made the model."""
    cat = Catalog(tmp_path / "c.duckdb")
    base, a, b = _reg(cat, "base", "base"), _reg(cat, "a", "expert"), _reg(cat, "b", "expert")
    first = cat.complete_run(_start(cat, "soup", "linear", [a, b], [1, 1]), "s3://models/soup", name="soup",
                             identity="id-soup")
    assert cat.base_of(first) is None
    again = cat.complete_run(_start(cat, "soup", "linear", [a, b], [1, 1], base=base), "s3://models/soup",
                             name="soup", identity="id-soup")
    assert again == first and cat.base_of(first) == "s3://models/base"
    assert cat.show(first)["produced_by"]["base_uri"] is None  # the first producer is still the producer
