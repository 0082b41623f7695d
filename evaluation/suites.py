"""Suites in YAML: which tasks, their data, metric and split, and the expert behind each held-in task.

Structure is validated when the suite is loaded (unknown keys, unknown metric, missing expert),
so a typo fails before any model is read. Relative data paths are relative to the suite file.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import yaml

from .data import read_bytes
from .tasks import HELD_IN, HELD_OUT, SPLITS, EvaluationDataError, Task, get_metric, suggest

_TASK_KEYS = {"name", "metric", "data", "split", "expert", "max_new_tokens", "stop"}
_SPLIT_ALIASES = {"held_in": HELD_IN, "held-in": HELD_IN, "heldin": HELD_IN,
                  "held_out": HELD_OUT, "held-out": HELD_OUT, "heldout": HELD_OUT}


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[Task, ...]
    source: str = "<memory>"

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"suite {self.name!r} has no task {name!r}.{suggest(name, self.names())}")

    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def split(self, split: str) -> list[Task]:
        return [t for t in self.tasks if t.split == split]

    def experts(self) -> dict[str, list[str]]:
        """expert name -> the held-in tasks it was trained on (what the flow must evaluate it on)."""
        out: dict[str, list[str]] = {}
        for t in self.split(HELD_IN):
            out.setdefault(t.expert, []).append(t.name)
        return out


def load_suite(source: str | Path) -> Suite:
    """Load a suite YAML from a local path or s3:// URI."""
    source = str(source)
    text = read_bytes(source, what="suite file")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EvaluationDataError(f"{source}: not valid YAML ({exc})") from None
    if source.startswith("s3://"):
        base = posixpath.dirname(source)
    else:
        base = str(Path(source[len("file://"):] if source.startswith("file://") else source).resolve().parent)
    return parse_suite(doc, base=base, source=source)


def parse_suite(doc, *, base: str = ".", source: str = "<memory>") -> Suite:
    """Build a Suite from the parsed YAML mapping; `base` resolves relative data paths."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise EvaluationDataError(f"{source}: a suite is a mapping with a non-empty 'tasks' list")
    unknown = set(doc) - {"name", "tasks", "description"}
    if unknown:
        raise EvaluationDataError(f"{source}: unknown suite key(s) {sorted(unknown)}")
    tasks = [_parse_task(entry, i, base, source) for i, entry in enumerate(doc["tasks"])]
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            raise EvaluationDataError(f"{source}: task {t.name!r} appears twice")
        seen.add(t.name)
    name = str(doc.get("name") or Path(source).stem)
    return Suite(name=name, tasks=tuple(tasks), source=source)


def _parse_task(entry, index: int, base: str, source: str) -> Task:
    where = f"{source}: tasks[{index}]"
    if not isinstance(entry, dict):
        raise EvaluationDataError(f"{where}: each task is a mapping")
    unknown = sorted(set(entry) - _TASK_KEYS)
    if unknown:
        raise EvaluationDataError(f"{where}: unknown key {unknown[0]!r}.{suggest(unknown[0], _TASK_KEYS)}")
    for key in ("name", "metric", "data", "split"):
        if not entry.get(key):
            raise EvaluationDataError(f"{where}: missing {key!r}")
    name = str(entry["name"])
    where = f"{source}: task {name!r}"
    try:
        metric = get_metric(str(entry["metric"])).name
    except EvaluationDataError as exc:
        raise EvaluationDataError(f"{where}: {exc}") from None
    split = _SPLIT_ALIASES.get(str(entry["split"]).lower())
    if split is None:
        raise EvaluationDataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {entry['split']!r}")
    expert = entry.get("expert")
    if split == HELD_IN and not expert:
        raise EvaluationDataError(f"{where}: held-in task must name the 'expert' trained on it")
    if split == HELD_OUT and expert:
        raise EvaluationDataError(f"{where}: held-out task names an expert ({expert!r}); held-out means none")
    max_new = entry.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
        raise EvaluationDataError(f"{where}: max_new_tokens must be a positive integer")
    stop = entry.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not all(isinstance(s, str) and s for s in stop):
        raise EvaluationDataError(f"{where}: stop must be a string or a list of non-empty strings")
    if metric != "exact_match" and (max_new is not None or stop):
        raise EvaluationDataError(f"{where}: max_new_tokens/stop only apply to exact_match")
    return Task(name=name, metric=metric, data=resolve_uri(str(entry["data"]), base), split=split,
                expert=str(expert) if expert else None, max_new_tokens=max_new, stop=tuple(stop))


def resolve_uri(uri: str, base: str) -> str:
    """Absolute paths and URIs pass through; relative paths join the suite's directory (or prefix)."""
    if uri.startswith(("s3://", "file://")) or Path(uri).is_absolute():
        return uri
    if base.startswith("s3://"):
        return "s3://" + posixpath.normpath(posixpath.join(base[len("s3://"):], uri))
    return str((Path(base) / uri).resolve())


def dump_suite(suite: Suite, base: str | Path | None = None) -> str:
    """YAML text for a suite; data paths are written relative to `base` when they lie under it."""
    tasks = []
    for t in suite.tasks:
        data = t.data
        if base is not None and not data.startswith(("s3://", "file://")):
            try:
                data = Path(data).resolve().relative_to(Path(base).resolve()).as_posix()
            except ValueError:
                pass
        entry = {"name": t.name, "metric": t.metric, "data": data, "split": t.split}
        if t.expert:
            entry["expert"] = t.expert
        if t.max_new_tokens:
            entry["max_new_tokens"] = t.max_new_tokens
        if t.stop:
            entry["stop"] = list(t.stop)
        tasks.append(entry)
    return yaml.safe_dump({"name": suite.name, "tasks": tasks}, sort_keys=False)
