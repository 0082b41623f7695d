"""The demo pipeline in a reduced configuration (2 of 3 experts, one method), end to end: zoo -> S3 ->
merge flow -> evaluate flow -> catalog -> report. Also checks the recorded normalisation against
the recorded absolute scores of the references."""

from __future__ import annotations

import dataclasses

import pytest
from rich.console import Console

from evaluation.evaluate import load_suite_data
from evaluation.suites import Suite, load_suite
from flows.demo import main, run_demo
from flows.evaluate_flow import task_digests
from storage.catalog import Catalog


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_api, s3_server):
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(k, v)
    work = tmp_path_factory.mktemp("demo")
    try:
        summary = run_demo(work, "demo-test", ["ties"], [2], Console(quiet=True), zoo_tasks="copy,upper,reverse", zoo_steps=30)
        yield work, summary
    finally:
        mp.undo()


def test_demo_reports_and_records_everything(demo):
    work, summary = demo
    report = (work / "report.md").read_text()
    assert "| ties |" in report and "2 experts" in report
    assert (work / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cat = Catalog(summary["catalog"])
    [run] = cat.runs()
    assert run["status"] == "succeeded" and run["method"] == "ties"
    lineage = str(cat.lineage("ties-2"))
    assert "copy" in lineage and "upper" in lineage and "base" in lineage


def test_recorded_normalisation_matches_recorded_reference_scores(demo):
    _, summary = demo
    cat = Catalog(summary["catalog"])
    rows = cat.sql(
        "SELECT c.name, e.task, e.split, e.metric, e.value, e.normalized_value, e.normalized_against "
        "FROM evaluations e JOIN checkpoints c ON c.id = e.checkpoint_id"
    )
    merged = [r for r in rows if r["name"] == "ties-2"]
    # held-in: only the tasks of the two experts merged (the zoo's third expert, reverse, is not)
    assert {r["task"] for r in merged} == {"copy", "upper", "min_choice", "double_ppl", "ends"}
    for r in merged:
        ref_name = r["task"] if r["split"] == "held-in" else "base"
        assert r["normalized_against"].startswith(ref_name)
        [ref] = [x["value"] for x in rows if x["name"] == ref_name and x["task"] == r["task"]]
        if ref == 0 or (r["metric"] == "perplexity" and r["value"] == 0):
            assert r["normalized_value"] is None
        elif r["metric"] == "perplexity":  # lower is better: inverted so that 1.0 means "as good"
            assert r["normalized_value"] == pytest.approx(ref / r["value"])
        else:
            assert r["normalized_value"] == pytest.approx(r["value"] / ref)
    result = summary["results"][("ties", 2)]
    defined = [r["normalized_value"] for r in merged if r["split"] == "held-out" and r["normalized_value"] is not None]
    assert result["held_out"] == pytest.approx(sum(defined) / len(defined))



def test_a_task_defined_differently_is_a_different_evaluation_cache_entry(demo):
    """Scores are cached per checkpoint and task: a task whose definition changed (its generation
    budget here) must miss the cache, and only that task."""
    work, _ = demo
    suite = load_suite(work / "zoo" / "suite.yaml")
    data = {d.task.name: d.digest for d in load_suite_data(suite)}
    short = Suite(suite.name, tuple(dataclasses.replace(t, max_new_tokens=1) if t.name == "copy" else t
                                    for t in suite.tasks))
    before, after = task_digests(suite, data), task_digests(short, data)
    assert before == task_digests(load_suite(work / "zoo" / "suite.yaml"), data)
    assert [t for t in before if before[t] != after[t]] == ["copy"]


@pytest.mark.parametrize("args, message", [(["--sizes", "16"], "--sizes"), (["--sizes", "abc"], "--sizes"),
                                           (["--methods", ","], "--methods"), (["--methods", "slerp"], "slerp")])
def test_bad_demo_options_are_usage_errors_before_any_work(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--workdir", str(tmp_path / "demo")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "demo").exists()
