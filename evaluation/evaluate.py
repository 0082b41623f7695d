"""The entry point the flow calls: score one local checkpoint directory on a suite.

All task data is read and validated before the model is loaded, so bad data fails in
milliseconds, not after a multi-gigabyte load.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from . import evaluators
from .data import TaskData, load_task_data
from .scores import TaskScore
from .suites import Suite, load_suite


def load_suite_data(suite: Suite | str | Path, tasks: Iterable[str] | None = None) -> list[TaskData]:
    """Validated examples + digest for the suite's tasks (all, or the named subset, in suite order)."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    if tasks is None:
        selected = list(suite.tasks)
    else:
        wanted = list(tasks)
        for name in wanted:
            suite.task(name)  # raises with a suggestion on a typo
        selected = [t for t in suite.tasks if t.name in set(wanted)]
    return [load_task_data(t) for t in selected]


def score_task(model, tokenizer, data: TaskData, *, batch_size: int = 32) -> TaskScore:
    """One task's absolute score for an already-loaded model."""
    task, ex = data.task, data.examples
    if task.metric == "perplexity":
        value = evaluators.perplexity(model, tokenizer, [e["text"] for e in ex], batch_size=batch_size)
    elif task.metric == "exact_match":
        value = evaluators.exact_match(
            model, tokenizer, [e["prompt"] for e in ex], [e["answer"] for e in ex],
            max_new_tokens=task.max_new_tokens, stop=task.stop, batch_size=batch_size,
        )
    elif task.metric == "multiple_choice":
        value = evaluators.multiple_choice(
            model, tokenizer, [e["prompt"] for e in ex], [e["choices"] for e in ex],
            [e["answer"] for e in ex], batch_size=batch_size,
        )
    else:  # suites validate metrics; this guards hand-built Tasks
        raise ValueError(f"task {task.name!r}: no evaluator for metric {task.metric!r}")
    return TaskScore(task=task.name, split=task.split, metric=task.metric, value=float(value),
                     num_examples=len(ex), data_digest=data.digest)


def evaluate_model(model, tokenizer, data: Iterable[TaskData], *, batch_size: int = 32) -> list[TaskScore]:
    return [score_task(model, tokenizer, d, batch_size=batch_size) for d in data]


def evaluate_checkpoint(model_dir: str | Path, suite: Suite | str | Path, *, device: str = "cpu",
                        batch_size: int = 32, tasks: Iterable[str] | None = None,
                        dtype: str | None = None) -> list[TaskScore]:
    """Score the HF-layout checkpoint in the LOCAL directory `model_dir` on `suite` (a Suite, or
    a YAML path / s3:// URI). `tasks` restricts to a subset, e.g. an expert's own tasks; `dtype`
    ("bfloat16", "float16", "float32") overrides the checkpoint's dtype, e.g. bf16 on a GPU."""
    torch_dtype = _torch_dtype(dtype)
    data = load_suite_data(suite, tasks)
    model, tokenizer = evaluators.load_model(model_dir, device=device, dtype=torch_dtype)
    return evaluate_model(model, tokenizer, data, batch_size=batch_size)


def _torch_dtype(name: str | None):
    if name is None:
        return None
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {name!r}; use bfloat16, float16 or float32")
    return dtype
