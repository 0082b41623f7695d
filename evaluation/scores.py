"""Scores and their normalisation, as in Yadav et al. 2024, "What Matters for Model Merging at Scale?".

    held-in task t:  normalised = merged(t) / expert_t(t)   (the expert fine-tuned on t)
    held-out task t: normalised = merged(t) / base(t)

For a lower-is-better metric (perplexity) the ratio is inverted (reference / merged), so 1.0
always means "as good as the reference" and above 1.0 means better. A zero denominator gives
`None` with a note, never a crash or an infinity, and that task is left out of the split average.
Pure functions over plain dataclasses: no torch, no files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from .tasks import HELD_IN, HELD_OUT, METRICS, SPLITS


@dataclass(frozen=True)
class TaskScore:
    """One model's absolute score on one task, with the identity of the data it was computed on."""

    task: str
    split: str
    metric: str
    value: float
    num_examples: int
    data_digest: str  # sha256 of the task's JSONL bytes

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric].higher_is_better

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> TaskScore:
        return cls(task=d["task"], split=d["split"], metric=d["metric"], value=float(d["value"]),
                   num_examples=int(d["num_examples"]), data_digest=d["data_digest"])


@dataclass(frozen=True)
class NormalisedScore:
    task: str
    split: str
    metric: str
    value: float  # the merged model's absolute score
    reference: float  # the expert's (held-in) or the base's (held-out) score on this task
    reference_model: str  # "expert" or "base"
    normalised: float | None  # None when the ratio is undefined; see note
    note: str = ""


@dataclass(frozen=True)
class SplitSummary:
    split: str
    normalised_mean: float | None  # mean over tasks whose ratio is defined; None if there are none
    num_tasks: int
    num_undefined: int  # tasks left out of the mean because their ratio is undefined
    absolute_means: dict[str, float] = field(default_factory=dict)  # metric -> mean absolute score


@dataclass(frozen=True)
class Normalised:
    scores: tuple[NormalisedScore, ...]
    splits: dict[str, SplitSummary]

    def average(self, split: str) -> float | None:
        return self.splits[split].normalised_mean if split in self.splits else None


def ratio(value: float, reference: float, higher_is_better: bool) -> tuple[float | None, str]:
    """(normalised score, note). value/reference, or reference/value when lower is better."""
    num, den = (value, reference) if higher_is_better else (reference, value)
    if den == 0:
        who = "reference" if higher_is_better else "merged model"
        return None, f"undefined: the {who} scores 0"
    if not math.isfinite(num) or math.isnan(den):
        return None, "undefined: a score is not finite"
    return num / den, ""


def _by_task(scores: Mapping[str, TaskScore] | Iterable[TaskScore], what: str) -> dict[str, TaskScore]:
    if isinstance(scores, Mapping):
        return dict(scores)
    out: dict[str, TaskScore] = {}
    for s in scores:
        if s.task in out:
            raise ValueError(f"{what}: two scores for task {s.task!r}")
        out[s.task] = s
    return out


def normalise(merged: Sequence[TaskScore],
              experts_by_task: Mapping[str, TaskScore] | Iterable[TaskScore],
              base: Mapping[str, TaskScore] | Iterable[TaskScore]) -> Normalised:
    """Normalise a merged model's scores: held-in by the task's expert, held-out by the base.

    `experts_by_task` maps each held-in task to the score of the expert trained on it (or is a
    list of such scores); `base` holds the base model's scores (only held-out ones are used).
    References must be on the same data (digest) and metric as the merged score.
    """
    experts = _by_task(experts_by_task, "experts_by_task")
    bases = _by_task(base, "base")
    out = []
    for m in merged:
        if m.split not in SPLITS:
            raise ValueError(f"task {m.task!r}: unknown split {m.split!r}")
        refs, kind = (experts, "expert") if m.split == HELD_IN else (bases, "base")
        ref = refs.get(m.task)
        if ref is None:
            raise ValueError(f"held-{'in' if kind == 'expert' else 'out'} task {m.task!r} has no {kind} score "
                             "to normalise by")
        if ref.metric != m.metric:
            raise ValueError(f"task {m.task!r}: merged metric {m.metric!r} != {kind} metric {ref.metric!r}")
        if ref.data_digest != m.data_digest:
            raise ValueError(f"task {m.task!r}: the {kind} score was computed on different data "
                             f"({ref.data_digest[:12]} != {m.data_digest[:12]})")
        value, note = ratio(m.value, ref.value, m.higher_is_better)
        out.append(NormalisedScore(m.task, m.split, m.metric, m.value, ref.value, kind, value, note))
    return Normalised(tuple(out), {s: summarise(out, s) for s in (HELD_IN, HELD_OUT)
                                   if any(n.split == s for n in out)})


def summarise(scores: Sequence[NormalisedScore], split: str) -> SplitSummary:
    """Per-split means: of the defined normalised scores, and of absolute scores per metric."""
    mine = [s for s in scores if s.split == split]
    defined = [s.normalised for s in mine if s.normalised is not None]
    by_metric: dict[str, list[float]] = {}
    for s in mine:
        by_metric.setdefault(s.metric, []).append(s.value)
    return SplitSummary(
        split=split,
        normalised_mean=sum(defined) / len(defined) if defined else None,
        num_tasks=len(mine),
        num_undefined=len(mine) - len(defined),
        absolute_means={k: sum(v) / len(v) for k, v in sorted(by_metric.items())},
    )


def format_table(normalised: Normalised) -> str:
    """A plain-text table of a normalisation, for logs and the CLI."""
    lines = [f"{'task':<16} {'split':<9} {'metric':<16} {'merged':>9} {'ref':>9} {'ref by':<7} {'norm':>7}"]
    for s in normalised.scores:
        norm = f"{s.normalised:7.3f}" if s.normalised is not None else "    n/a"
        lines.append(f"{s.task:<16} {s.split:<9} {s.metric:<16} {s.value:9.4f} {s.reference:9.4f} "
                     f"{s.reference_model:<7} {norm}" + (f"  ({s.note})" if s.note else ""))
    for summary in normalised.splits.values():
        mean = f"{summary.normalised_mean:.3f}" if summary.normalised_mean is not None else "n/a"
        lines.append(f"{summary.split} average normalised: {mean} over "
                     f"{summary.num_tasks - summary.num_undefined}/{summary.num_tasks} tasks")
    return "\n".join(lines)
