"""Suite YAML and task data: path resolution, s3://, and clear errors for every kind of bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import boto3
import pytest

from evaluation import EvaluationDataError, load_suite
from evaluation.data import load_task_data
from evaluation.evaluate import load_suite_data
from evaluation.suites import dump_suite, parse_suite


def write_suite(tmp_path: Path, tasks_yaml: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text("name: demo\ntasks:\n" + tasks_yaml)
    return path


def jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


EM = "  - {name: add, metric: exact_match, data: data/add.jsonl, split: held_in, expert: add-expert}\n"


def test_load_suite_resolves_relative_paths_and_splits(tmp_path):
    jsonl(tmp_path / "data" / "add.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": 4}])
    suite = load_suite(write_suite(tmp_path, EM + "  - {name: mc, metric: multiple_choice, "
                                   f"data: {tmp_path / 'mc.jsonl'}, split: held-out}}\n"))
    add, mc = suite.tasks
    assert suite.name == "demo" and suite.names() == ["add", "mc"]
    assert add.data == str(tmp_path / "data" / "add.jsonl") and add.split == "held_in"
    assert mc.data == str(tmp_path / "mc.jsonl") and mc.split == "held_out" and mc.expert is None
    assert suite.experts() == {"add-expert": ["add"]}
    data = load_task_data(add)
    assert data.examples[1] == {"prompt": "2+2=", "answer": "4"}  # numeric answers become strings
    assert data.digest == hashlib.sha256((tmp_path / "data" / "add.jsonl").read_bytes()).hexdigest()


def test_missing_data_file_is_named(tmp_path):
    suite = load_suite(write_suite(tmp_path, EM))
    with pytest.raises(FileNotFoundError, match=r"task 'add' not found: .*data/add.jsonl"):
        load_suite_data(suite)


def test_missing_suite_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="suite file not found: .*nope.yaml"):
        load_suite(tmp_path / "nope.yaml")


def test_malformed_jsonl_line_gives_file_and_line(tmp_path):
    path = jsonl(tmp_path / "data" / "add.jsonl", [{"prompt": "a", "answer": "b"}, "", '{"prompt": "a", "answer"'])
    suite = load_suite(write_suite(tmp_path, EM))
    with pytest.raises(EvaluationDataError, match=rf"{path}:3: malformed JSONL line"):
        load_suite_data(suite)
    jsonl(path, [{"prompt": "a", "answer": "b"}, "[1, 2]"])
    with pytest.raises(EvaluationDataError, match=rf"{path}:2: expected a JSON object, got list"):
        load_suite_data(suite)


def test_missing_field_gives_line_and_field(tmp_path):
    path = jsonl(tmp_path / "data" / "add.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "c"}])
    with pytest.raises(EvaluationDataError, match=rf"{path}:2: missing field 'answer'"):
        load_suite_data(load_suite(write_suite(tmp_path, EM)))


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "choices": ["a", "b"], "answer": "c"}, "answer 'c' is not one of the choices"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 2}, "answer index 2 out of range"),
    ({"prompt": "p", "choices": ["a"], "answer": 0}, "field .choices. must be a list of at least 2 non-empty strings"),
    ({"prompt": 3, "choices": ["a", "b"], "answer": 0}, "field 'prompt' must be a string"),
])
def test_bad_multiple_choice_rows(tmp_path, row, message):
    jsonl(tmp_path / "mc.jsonl", [row])
    suite = load_suite(write_suite(tmp_path, "  - {name: mc, metric: multiple_choice, data: mc.jsonl, "
                                             "split: held_out}\n"))
    with pytest.raises(EvaluationDataError, match=r"mc.jsonl:1: " + message):
        load_suite_data(suite)


def test_empty_data_file_is_an_error(tmp_path):
    jsonl(tmp_path / "data" / "add.jsonl", ["", "  "])
    with pytest.raises(EvaluationDataError, match="no examples for task 'add'"):
        load_suite_data(load_suite(write_suite(tmp_path, EM)))


@pytest.mark.parametrize("task_yaml, message", [
    ("{name: a, metric: exact_mach, data: x.jsonl, split: held_out}",
     "unknown metric 'exact_mach'. Did you mean 'exact_match'?"),
    ("{name: a, metric: perplexity, data: x.jsonl, split: held_in}", "must name the 'expert'"),
    ("{name: a, metric: perplexity, data: x.jsonl, split: held_out, expert: e}", "held-out means none"),
    ("{name: a, metric: perplexity, data: x.jsonl, split: test}", "split must be one of held_in, held_out"),
    ("{name: a, metric: perplexity, data: x.jsonl, split: held_out, expret: e}",
     "unknown key 'expret'. Did you mean 'expert'?"),
    ("{name: a, metric: perplexity, split: held_out}", "missing 'data'"),
    ("{name: a, metric: perplexity, data: x.jsonl, split: held_out, stop: x}", "only apply to exact_match"),
    ("{name: a, metric: exact_match, data: x.jsonl, split: held_out, max_new_tokens: 0}",
     "max_new_tokens must be a positive integer"),
])
def test_bad_suite_entries(tmp_path, task_yaml, message):
    with pytest.raises(EvaluationDataError, match=message.replace("?", r"\?").replace(".", r"\.")):
        load_suite(write_suite(tmp_path, f"  - {task_yaml}\n"))


def test_duplicate_tasks_and_bad_yaml(tmp_path):
    with pytest.raises(EvaluationDataError, match="task 'add' appears twice"):
        load_suite(write_suite(tmp_path, EM + EM))
    (tmp_path / "bad.yaml").write_text("tasks: [\n")
    with pytest.raises(EvaluationDataError, match="not valid YAML"):
        load_suite(tmp_path / "bad.yaml")
    with pytest.raises(EvaluationDataError, match="non-empty 'tasks' list"):
        parse_suite({"name": "x"})


def test_unknown_task_subset_is_an_error(tmp_path):
    suite = load_suite(write_suite(tmp_path, EM))
    with pytest.raises(KeyError, match="no task 'ad'. Did you mean 'add'"):
        load_suite_data(suite, tasks=["ad"])


def test_dump_suite_round_trips(tmp_path):
    suite = load_suite(write_suite(tmp_path, EM + "  - {name: g, metric: exact_match, data: g.jsonl, "
                                   "split: held_out, max_new_tokens: 7, stop: [\"\\n\"]}\n"))
    (tmp_path / "again.yaml").write_text(dump_suite(suite, base=tmp_path))
    assert "data: data/add.jsonl" in (tmp_path / "again.yaml").read_text()
    again = load_suite(tmp_path / "again.yaml")
    assert again.tasks == suite.tasks


def test_suite_and_data_on_s3(bucket, s3_env):
    s3 = boto3.client("s3", endpoint_url=s3_env)
    body = b'{"text": "hello"}\n{"text": "world"}\n'
    s3.put_object(Bucket=bucket, Key="evals/data/lm.jsonl", Body=body)
    s3.put_object(Bucket=bucket, Key="evals/suite.yaml", Body=(
        b"tasks:\n  - {name: lm, metric: perplexity, data: data/lm.jsonl, split: held_out}\n"
        b"  - {name: gone, metric: perplexity, data: ../missing.jsonl, split: held_out}\n"))
    suite = load_suite(f"s3://{bucket}/evals/suite.yaml")
    assert suite.task("lm").data == f"s3://{bucket}/evals/data/lm.jsonl"
    assert suite.task("gone").data == f"s3://{bucket}/missing.jsonl"
    [data] = load_suite_data(suite, tasks=["lm"])
    assert [e["text"] for e in data.examples] == ["hello", "world"]
    assert data.digest == hashlib.sha256(body).hexdigest()
    with pytest.raises(FileNotFoundError, match=f"task 'gone' not found: s3://{bucket}/missing.jsonl"):
        load_suite_data(suite, tasks=["gone"])
