"""The offline zoo: a reduced build that must load with Auto* classes and pass its own margin check,
caching, determinism (also across worker processes), and the synthetic tasks themselves."""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest

from evaluation import load_suite
from evaluation import zoo as zoo_mod
from evaluation.evaluate import evaluate_checkpoint
from evaluation.zoo import ZooBuildError, ZooConfig, build_zoo, cached_manifest
from evaluation.zoo_tasks import HELD_IN_TASKS, HELD_OUT_TASKS, make_split, noisy_pretraining

# two single-character-answer tasks a fresh base + expert learn in seconds
SMALL = ZooConfig(tasks=("max", "last"), held_out=("min_choice",), n_train=1000, n_test=50, base_steps=250,
                  base_lr=5e-3, batch_size=32, expert_steps=80, expert_lr=3e-3)
MICRO = replace(SMALL, n_train=200, n_test=10, base_steps=10, expert_steps=5, min_margin=-1.0)


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    logs: list[str] = []
    manifest = build_zoo(out, SMALL, workers=1, log=logs.append)
    return out, manifest, "\n".join(logs)


def test_reduced_zoo_layout_and_manifest(small_zoo):
    out, manifest, logs = small_zoo
    for rel in ["base/config.json", "base/model.safetensors", "base/tokenizer.json", "experts/max/model.safetensors",
                "experts/last/tokenizer_config.json", "data/max/train.jsonl", "data/min_choice/test.jsonl",
                "suite.yaml", "zoo.json", "zoo.key"]:
        assert (out / rel).is_file(), rel
    assert json.loads((out / "zoo.json").read_text()) == manifest
    assert manifest["experts"] == {"max": "experts/max", "last": "experts/last"}
    assert manifest["data"]["min_choice"]["in_base_pretraining"] is False
    assert "check (>= 0.30)" in logs and "FAIL" not in logs
    suite = load_suite(out / "suite.yaml")
    assert [(t.name, t.split, t.expert) for t in suite.tasks] == [
        ("max", "held_in", "max"), ("last", "held_in", "last"), ("min_choice", "held_out", None)]
    assert "data: data/max/test.jsonl" in (out / "suite.yaml").read_text()  # relative to the suite file
    for score in manifest["base_scores"]:
        digest = hashlib.sha256(Path(suite.task(score["task"]).data).read_bytes()).hexdigest()
        assert score["data_digest"] == digest and score["num_examples"] == 50


def test_saved_models_load_with_auto_classes(small_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = small_zoo
    for d in ["base", "experts/max", "experts/last"]:
        model = AutoModelForCausalLM.from_pretrained(out / d)
        tok = AutoTokenizer.from_pretrained(out / d)
        assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
        ids = tok("max 391=")["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("max 391=")
        assert tok.decode(ids, skip_special_tokens=True) == "max 391="


def test_every_expert_beats_the_base_on_its_task_after_reloading(small_zoo):
    out, manifest, _ = small_zoo
    base = {s.task: s for s in evaluate_checkpoint(out / "base", out / "suite.yaml")}
    assert {t: s.value for t, s in base.items()} == {s["task"]: s["value"] for s in manifest["base_scores"]}
    for name, rel in manifest["experts"].items():
        [score] = evaluate_checkpoint(out / rel, out / "suite.yaml", tasks=[name])
        assert score.value == manifest["expert_scores"][name]["value"]  # what was saved is what was scored
        assert score.value - base[name].value >= SMALL.min_margin, name
        assert 0 < manifest["expert_relative_delta"][name] < 1


def test_second_call_is_a_cache_hit(small_zoo, monkeypatch):
    out, manifest, _ = small_zoo
    mtime = (out / "base" / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt despite a matching cache key")

    monkeypatch.setattr(zoo_mod, "_build", no_rebuild)
    t0 = time.perf_counter()
    assert build_zoo(out, SMALL, log=lambda m: None) == manifest
    assert time.perf_counter() - t0 < 1.0
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == mtime
    assert cached_manifest(out, replace(SMALL, seed=1)) is None  # any config change invalidates


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.suffix in (".safetensors", ".jsonl", ".yaml")}


def test_build_is_deterministic_across_worker_counts(tmp_path):
    one = build_zoo(tmp_path / "a", MICRO, workers=1, log=lambda m: None)
    two = build_zoo(tmp_path / "b", MICRO, workers=2, log=lambda m: None)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert len(_digests(tmp_path / "a")) == 3 + 6 + 1  # 3 models, 3 tasks x {train,test}, suite
    assert one["expert_scores"] == two["expert_scores"] and one["key"] == two["key"]


def test_failed_margin_check_raises_and_leaves_no_cache_key(tmp_path):
    with pytest.raises(ZooBuildError, match=r"expert\(s\) \['max', 'last'\] beat the base by less than 0.30"):
        build_zoo(tmp_path, replace(MICRO, expert_steps=0, min_margin=0.3), workers=1, log=lambda m: None)
    assert not (tmp_path / "zoo.key").exists()
    assert (tmp_path / "zoo.json").exists()  # the scores stay for inspection


def test_unknown_task_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown zoo task\(s\) \['nope'\]"):
        build_zoo(tmp_path, tasks=["nope"])


def test_cli_reports_a_failed_check(tmp_path, monkeypatch, capsys):
    def failing(*a, **k):
        raise ZooBuildError("zoo check failed: expert(s) ['x']")

    monkeypatch.setattr(zoo_mod, "build_zoo", failing)
    assert zoo_mod.main([str(tmp_path)]) == 1
    assert "zoo check failed" in capsys.readouterr().err


@pytest.mark.parametrize("name, prompt, answer", [
    ("reverse", "rev abc=", "cba"), ("sort", "sort 3912=", "1239"), ("upper", "upper abc=", "ABC"),
    ("shift", "next abj=", "bca"), ("dedup", "dedup abcab=", "abc"), ("count", "count a a abca=", None),
])
def test_task_generators_are_right(name, prompt, answer):
    rng = random.Random(0)
    for _ in range(200):
        e = HELD_IN_TASKS[name].make(rng)
        body = e["prompt"].split(" ", 1)[1][:-1]
        if name == "reverse":
            assert e["answer"] == body[::-1]
        elif name == "sort":
            assert e["answer"] == "".join(sorted(body))
        elif name == "count":
            char, word = body.split(" ")
            assert e["answer"] == str(word.count(char))
        elif name == "dedup":
            assert e["answer"] == "".join(dict.fromkeys(body))
    if answer is not None:  # the hand-written case, through the same rule the generator uses
        assert {"reverse": lambda b: b[::-1], "sort": lambda b: "".join(sorted(b)), "upper": str.upper,
                "shift": lambda b: "".join("abcdefghij"[("abcdefghij".index(c) + 1) % 10] for c in b),
                "dedup": lambda b: "".join(dict.fromkeys(b))}[name](prompt.split(" ", 1)[1][:-1]) == answer


def test_add_and_min_choice_examples():
    rng = random.Random(1)
    for _ in range(100):
        e = HELD_IN_TASKS["add"].make(rng)
        a, b = e["prompt"][4:-1].split("+")
        assert int(e["answer"]) == int(a) + int(b)
        mc = HELD_OUT_TASKS["min_choice"].make(rng)
        assert mc["choices"][mc["answer"]] == min(mc["prompt"][4:-1])


def test_splits_are_disjoint_and_noise_only_touches_answers():
    task = HELD_IN_TASKS["reverse"]
    train, test = make_split(task, 0, 500, 100)
    assert len(test) == 100 and len({e["prompt"] for e in test}) == 100
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    assert make_split(task, 0, 500, 100) == (train, test)  # a pure function of the seed
    noisy = noisy_pretraining(task, train, 0.65, 0)
    changed = [n for n, e in zip(noisy, train, strict=True) if n != e]
    assert [n["prompt"] for n in noisy] == [e["prompt"] for e in train]
    assert 0.55 < len(changed) / len(train) < 0.75
    assert all(n["answer"] == n["prompt"][4:-1] for n in changed)  # the distractor echoes the input
    assert noisy_pretraining(HELD_OUT_TASKS["ends"], train, 0.65, 0) == train  # no distractor: untouched
