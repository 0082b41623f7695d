"""Task data: JSONL bytes from a local path or s3://, parsed and validated with file:line errors.

The sha256 of the raw bytes is the data's identity: it travels with every score so that two
scores are only compared when they were computed on the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .tasks import EvaluationDataError, Task, validate_example


@dataclass(frozen=True)
class TaskData:
    task: Task
    examples: list[dict]
    digest: str  # sha256 hex of the JSONL bytes


def read_bytes(uri: str, *, what: str = "file") -> bytes:
    """Whole object at a local path, file:// or s3:// URI; FileNotFoundError names it."""
    if uri.startswith("s3://"):
        from storage import s3

        bucket, key = s3.split_s3_uri(uri)
        try:
            return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore's ClientError; its code says whether the object is missing
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NoSuchBucket"):
                raise FileNotFoundError(f"{what} not found: {uri}") from exc
            raise
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"{what} is a directory, not a file: {path}") from None


def parse_jsonl(data: bytes, source: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line raises with source:line."""
    records = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EvaluationDataError(f"{source}:{lineno}: malformed JSONL line ({exc})") from None
        if not isinstance(obj, dict):
            raise EvaluationDataError(f"{source}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append((lineno, obj))
    return records


def load_task_data(task: Task) -> TaskData:
    """Read, parse and validate a task's examples; empty files are an error, not a score of 0."""
    data = read_bytes(task.data, what=f"data file for task {task.name!r}")
    examples = [
        validate_example(task.metric, obj, f"{task.data}:{lineno}")
        for lineno, obj in parse_jsonl(data, task.data)
    ]
    if not examples:
        raise EvaluationDataError(f"{task.data}: no examples for task {task.name!r}")
    return TaskData(task, examples, hashlib.sha256(data).hexdigest())
