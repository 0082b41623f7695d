"""The zoo's synthetic tasks: tiny string/number problems a small char-level model learns in seconds.

Held-in tasks (one expert each) are exact-match prompt -> answer problems. Held-out tasks, which
no expert trains on, cover all three metrics so every evaluator is exercised: `ends` (exact
match) and `double_ppl` (perplexity) are in the base's pre-training mixture, `min_choice`
(multiple choice) is not, so the base meets it zero-shot. Every generator takes a
`random.Random`, so the data is a pure function of the seed.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LOWER = "abcdefghij"  # a small alphabet keeps the input space learnable for a 100k-parameter model


WORD = (3, 6)  # input lengths; answers of several characters make exact match a demanding metric


def _word(rng: random.Random, lo: int = WORD[0], hi: int = WORD[1], alphabet: str = LOWER) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, lo: int = WORD[0], hi: int = WORD[1]) -> str:
    return _word(rng, lo, hi, string.digits)


def add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    return {"prompt": f"add {a}+{b}=", "answer": str(a + b)}


def reverse(rng):
    w = _word(rng)
    return {"prompt": f"rev {w}=", "answer": w[::-1]}


def sort_digits(rng):
    d = _digits(rng)
    return {"prompt": f"sort {d}=", "answer": "".join(sorted(d))}


def copy(rng):
    w = _word(rng, alphabet=LOWER + string.digits)
    return {"prompt": f"copy {w}=", "answer": w}


def count(rng):
    w = _word(rng, 3, 9, "abc")
    c = rng.choice("abc")
    return {"prompt": f"count {c} {w}=", "answer": str(w.count(c))}


def upper(rng):
    w = _word(rng)
    return {"prompt": f"upper {w}=", "answer": w.upper()}


def shift(rng):
    w = _word(rng)
    return {"prompt": f"next {w}=", "answer": "".join(LOWER[(LOWER.index(ch) + 1) % len(LOWER)] for ch in w)}


def dedup(rng):
    w = _word(rng, alphabet="abcde")
    return {"prompt": f"dedup {w}=", "answer": "".join(ch for i, ch in enumerate(w) if ch not in w[:i])}


def max_digit(rng):
    d = _digits(rng)
    return {"prompt": f"max {d}=", "answer": max(d)}


def last_char(rng):
    w = _word(rng)
    return {"prompt": f"last {w}=", "answer": w[-1]}


def min_choice(rng):
    """Held-out, multiple choice: the smallest of four distinct digits, choices in input order."""
    d = rng.sample(string.digits, 4)
    return {"prompt": f"min {''.join(d)}=", "choices": d, "answer": d.index(min(d))}


def double_text(rng):
    """Held-out, perplexity: every letter doubled."""
    w = _word(rng, 3, 6)
    return {"text": f"dup {w}=" + "".join(ch * 2 for ch in w)}


def first_last(rng):
    """Held-out, exact match: first and last character."""
    w = _word(rng)
    return {"prompt": f"ends {w}=", "answer": w[0] + w[-1]}


def echo(example: dict) -> str:
    """The input echoed back: the prompt between the command word and '='."""
    return example["prompt"].split(" ", 1)[1].rstrip("=")


def echo_reversed(example: dict) -> str:
    return echo(example)[::-1]


@dataclass(frozen=True)
class ZooTask:
    name: str
    metric: str
    make: Callable[[random.Random], dict]
    held_in: bool
    # the wrong-but-plausible answer the base's noisy pre-training data often gives instead
    distractor: Callable[[dict], str] | None = None
    in_base: bool = True  # part of the base's pre-training mixture (False: the base meets it zero-shot)
    base_weight: int = 1  # copies in the base's mixture: more for skills that take longer to learn


HELD_IN_TASKS: dict[str, ZooTask] = {
    t.name: t for t in (
        ZooTask("add", "exact_match", add, True, echo, base_weight=3),
        ZooTask("reverse", "exact_match", reverse, True, echo),
        ZooTask("sort", "exact_match", sort_digits, True, echo),
        ZooTask("copy", "exact_match", copy, True, echo_reversed),
        ZooTask("count", "exact_match", count, True, echo),
        ZooTask("upper", "exact_match", upper, True, echo),
        ZooTask("shift", "exact_match", shift, True, echo),
        ZooTask("dedup", "exact_match", dedup, True, echo),
        # not in the default zoo: single-character answers, learnt in a few seconds (for tests)
        ZooTask("max", "exact_match", max_digit, True, echo),
        ZooTask("last", "exact_match", last_char, True, echo),
    )
}
DEFAULT_HELD_IN = ("add", "reverse", "sort", "copy", "count", "upper", "shift", "dedup")
HELD_OUT_TASKS: dict[str, ZooTask] = {
    t.name: t for t in (
        ZooTask("min_choice", "multiple_choice", min_choice, False, in_base=False),
        ZooTask("double_ppl", "perplexity", double_text, False),
        ZooTask("ends", "exact_match", first_last, False),
    )
}


def training_text(example: dict) -> tuple[str, str]:
    """(context, target) for fine-tuning on an example of any metric."""
    if "text" in example:
        ctx, _, tgt = example["text"].partition("=")
        return ctx + "=", tgt
    if "choices" in example:
        return example["prompt"], example["choices"][example["answer"]]
    return example["prompt"], example["answer"]


def noisy_pretraining(task: ZooTask, examples: list[dict], share: float, seed: int) -> list[dict]:
    """The base's view of a task: its examples `base_weight` times over, with `share` of the
    answers replaced by the task's distractor (drawn afresh for each repeat)."""
    rng = random.Random(f"{seed}:{task.name}:noise")
    if task.distractor is None or share <= 0:
        return examples * task.base_weight
    return [{**e, "answer": task.distractor(e)} if rng.random() < share else e
            for _ in range(task.base_weight) for e in examples]


def make_split(task: ZooTask, seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test examples (no test input appears in train), deterministic in `seed`."""
    rng = random.Random(f"{seed}:{task.name}")

    def key(e):
        return e.get("prompt", e.get("text"))

    test: list[dict] = []
    seen: set[str] = set()
    for _ in range(50 * n_test):
        if len(test) == n_test:
            break
        e = task.make(rng)
        if key(e) not in seen:
            seen.add(key(e))
            test.append(e)
    train = []
    for _ in range(50 * n_train):
        if len(train) == n_train:
            break
        e = task.make(rng)
        if key(e) not in seen:
            train.append(e)
    if len(test) < n_test or len(train) < n_train:
        raise ValueError(f"task {task.name!r}: input space too small for {n_train} train + {n_test} test")
    return train, test
