"""evaluation: score causal-LM checkpoints on task suites and normalise against experts and base.

    evaluate_checkpoint(model_dir, suite, *, device="cpu", batch_size=32, tasks=None) -> list[TaskScore]
    load_suite(path_or_s3_uri) -> Suite
    normalise(merged, experts_by_task, base) -> Normalised
    python -m evaluation.zoo OUT_DIR   # an offline base + 8 experts + suite to merge and evaluate

Torch and transformers are imported only when a model is evaluated, so suites and scores stay
cheap to import (the flow validates suites and normalises scores without loading a model).
"""

from .scores import Normalised, NormalisedScore, SplitSummary, TaskScore, format_table, normalise, ratio
from .suites import Suite, load_suite, parse_suite
from .tasks import HELD_IN, HELD_OUT, METRICS, EvaluationDataError, Task

__all__ = [
    "HELD_IN", "HELD_OUT", "METRICS", "EvaluationDataError", "Normalised", "NormalisedScore",
    "SplitSummary", "Suite", "Task", "TaskScore", "evaluate_checkpoint", "format_table", "load_suite",
    "normalise", "parse_suite", "ratio",
]


def __getattr__(name: str):
    if name == "evaluate_checkpoint":  # lazy: pulls in torch + transformers
        from .evaluate import evaluate_checkpoint

        return evaluate_checkpoint
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
