"""The zoo's synthetic tasks: tiny string/number problems a small char-level model learns in seconds.

Held-in tasks (one expert each) are exact-match prompt -> answer problems. Held-out tasks, which
no expert trains on, cover the other two metrics so every evaluator is exercised: a
multiple-choice task and a perplexity task, plus one exact-match task. Every generator takes a
`random.Random`, so the data is a pure function of the seed.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LOWER = "abcdefghij"  # a small alphabet keeps the input space learnable for a 100k-parameter model


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LOWER) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _len(short: bool) -> tuple[int, int]:
    """Input lengths: the base pre-trains on short inputs (1-3), experts and tests use 3-6."""
    return (1, 3) if short else (3, 6)


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return _word(rng, lo, hi, string.digits)


def add(rng, short=False):
    hi = 19 if short else 49
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return {"prompt": f"add {a}+{b}=", "answer": str(a + b)}


def reverse(rng, short=False):
    w = _word(rng, *_len(short))
    return {"prompt": f"rev {w}=", "answer": w[::-1]}


def sort_digits(rng, short=False):
    d = _digits(rng, *_len(short))
    return {"prompt": f"sort {d}=", "answer": "".join(sorted(d))}


def copy(rng, short=False):
    w = _word(rng, *_len(short), LOWER + string.digits)
    return {"prompt": f"copy {w}=", "answer": w}


def count(rng, short=False):
    w = _word(rng, *((1, 3) if short else (3, 8)), "abc")
    c = rng.choice("abc")
    return {"prompt": f"count {c} {w}=", "answer": str(w.count(c))}


def upper(rng, short=False):
    w = _word(rng, *_len(short))
    return {"prompt": f"upper {w}=", "answer": w.upper()}


def shift(rng, short=False):
    w = _word(rng, *_len(short))
    return {"prompt": f"next {w}=", "answer": "".join(LOWER[(LOWER.index(ch) + 1) % len(LOWER)] for ch in w)}


def max_digit(rng, short=False):
    d = _digits(rng, *_len(short))
    return {"prompt": f"max {d}=", "answer": max(d)}


def min_choice(rng, short=False):
    """Held-out, multiple choice: the smallest of four distinct digits, choices in input order."""
    d = rng.sample(string.digits, 2 if short else 4)
    return {"prompt": f"min {''.join(d)}=", "choices": d, "answer": d.index(min(d))}


def double_text(rng, short=False):
    """Held-out, perplexity: doubled letters, a format no expert sees."""
    w = _word(rng, *_len(short))
    return {"text": f"dup {w}=" + "".join(ch * 2 for ch in w)}


def first_last(rng, short=False):
    """Held-out, exact match: first and last character."""
    w = _word(rng, *_len(short))
    return {"prompt": f"ends {w}=", "answer": w[0] + w[-1]}


@dataclass(frozen=True)
class ZooTask:
    name: str
    metric: str
    make: Callable[[random.Random], dict]
    held_in: bool


HELD_IN_TASKS: dict[str, ZooTask] = {
    t.name: t for t in (
        ZooTask("add", "exact_match", add, True),
        ZooTask("reverse", "exact_match", reverse, True),
        ZooTask("sort", "exact_match", sort_digits, True),
        ZooTask("copy", "exact_match", copy, True),
        ZooTask("count", "exact_match", count, True),
        ZooTask("upper", "exact_match", upper, True),
        ZooTask("shift", "exact_match", shift, True),
        ZooTask("max", "exact_match", max_digit, True),
    )
}
HELD_OUT_TASKS: dict[str, ZooTask] = {
    t.name: t for t in (
        ZooTask("min_choice", "multiple_choice", min_choice, False),
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


def pretraining_examples(task: ZooTask, seed: int, n: int) -> list[dict]:
    """The base's view of a task: the same prompt format on short inputs only."""
    rng = random.Random(f"{seed}:{task.name}:short")
    return [task.make(rng, short=True) for _ in range(n)]


def make_split(task: ZooTask, seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test examples (no test input appears in train), deterministic in `seed`."""
    rng = random.Random(f"{seed}:{task.name}")
    key = (lambda e: e.get("prompt", e.get("text")))
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
