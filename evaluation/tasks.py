"""Tasks and metrics as data: what a task is, which fields its examples need, which way is better.

Kept free of torch so suites can be validated (and scores normalised) without loading a model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

HELD_IN = "held_in"
HELD_OUT = "held_out"
SPLITS = (HELD_IN, HELD_OUT)


class EvaluationDataError(ValueError):
    """A suite or its data is unusable; the message names the file (and line) to fix."""


@dataclass(frozen=True)
class Metric:
    name: str
    fields: tuple[str, ...]  # required keys of each JSONL example
    higher_is_better: bool
    description: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("perplexity", ("text",), False,
               "token-level perplexity of `text` (exp of mean next-token NLL over the file)"),
        Metric("exact_match", ("prompt", "answer"), True,
               "fraction of prompts whose greedy continuation equals `answer` (whitespace-stripped)"),
        Metric("multiple_choice", ("prompt", "choices", "answer"), True,
               "fraction of prompts where the `answer` choice has the highest log-likelihood"),
    )
}


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise EvaluationDataError(
            f"unknown metric {name!r}.{suggest(name, METRICS)} Known metrics: {', '.join(sorted(METRICS))}."
        )
    return METRICS[name]


@dataclass(frozen=True)
class Task:
    """One suite entry. `data` is a resolved URI (absolute local path or s3://)."""

    name: str
    metric: str
    data: str
    split: str
    expert: str | None = None  # held-in only: the expert fine-tuned on this task
    max_new_tokens: int | None = None  # exact_match: default is longest answer + 2 tokens
    stop: tuple[str, ...] = ()  # exact_match: cut the generation at the first of these strings

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric].higher_is_better


def validate_example(metric: str, example: dict, where: str) -> dict:
    """Check one parsed JSONL record against its metric; returns it normalised (answer as index)."""
    spec = get_metric(metric)
    missing = [f for f in spec.fields if f not in example]
    if missing:
        raise EvaluationDataError(
            f"{where}: missing field {missing[0]!r} (metric {metric!r} needs {', '.join(spec.fields)})"
        )
    if metric == "perplexity":
        _require_str(example, "text", where)
        return {"text": example["text"]}
    _require_str(example, "prompt", where)
    if metric == "exact_match":
        answer = example["answer"]
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise EvaluationDataError(f"{where}: field 'answer' must be a string, got {type(answer).__name__}")
        return {"prompt": example["prompt"], "answer": answer}
    choices = example["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise EvaluationDataError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
    answer = example["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int | str):
        raise EvaluationDataError(f"{where}: field 'answer' must be a choice index or one of the choices")
    if isinstance(answer, str):
        if answer not in choices:
            raise EvaluationDataError(f"{where}: answer {answer!r} is not one of the choices {choices!r}")
        answer = choices.index(answer)
    elif not 0 <= answer < len(choices):
        raise EvaluationDataError(f"{where}: answer index {answer} out of range for {len(choices)} choices")
    return {"prompt": example["prompt"], "choices": list(choices), "answer": answer}


def _require_str(example: dict, key: str, where: str) -> None:
    if not isinstance(example[key], str):
        raise EvaluationDataError(f"{where}: field {key!r} must be a string, got {type(example[key]).__name__}")
