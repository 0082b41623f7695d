"""An offline model zoo built from nothing but code: a tiny Llama base, one expert per task, a suite.

    python -m evaluation.zoo OUT_DIR [--force] [--workers N]

The base is pre-trained briefly on a noisy mixture of the tasks: for each held-in task most
answers in its data are a plausible wrong one (the input echoed back), so the base knows the
prompt format and the skills but mostly answers with the distractor. Each expert is a short,
low-learning-rate fine-tune of the base on its own task's clean data, so expert deltas are
small and merging them is meaningful. The build checks that every expert beats the base on its
own task by `min_margin` exact match, prints that check as a table, and fails loudly if not.

Deterministic (fixed seeds, one thread per model, deterministic algorithms; experts may train in
parallel processes without changing a bit) and cached: OUT/zoo.key holds a digest of the builder
version, config and library versions, written last; a second call with the same key returns at once.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .suites import Suite, dump_suite, load_suite
from .tasks import HELD_IN, HELD_OUT, Task
from .zoo_tasks import DEFAULT_HELD_IN, HELD_IN_TASKS, HELD_OUT_TASKS, ZooTask, make_split, noisy_pretraining

ZOO_VERSION = "1"  # bump when the builder's output changes for the same config


@dataclass(frozen=True)
class ZooConfig:
    tasks: tuple[str, ...] = DEFAULT_HELD_IN  # held-in: one expert each
    held_out: tuple[str, ...] = tuple(HELD_OUT_TASKS)
    seed: int = 0
    n_train: int = 2000  # training examples per task
    n_test: int = 150  # evaluation examples per task (the suite's data)
    base_steps: int = 1200
    base_lr: float = 3e-3
    base_distractor_share: float = 0.65  # of held-in answers in the base's data that are the distractor
    expert_steps: int = 200
    expert_lr: float = 3e-4  # low: experts stay close to the base
    batch_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 64
    min_margin: float = 0.30  # required expert-minus-base exact match on the expert's own task
    eval_batch_size: int = 256

    def key(self) -> str:
        """Digest of everything that determines the zoo's bytes (not `workers`, which does not)."""
        from importlib.metadata import version  # not `import torch`: a cache hit must be instant

        blob = json.dumps({"version": ZOO_VERSION, "config": asdict(self), "torch": version("torch"),
                           "transformers": version("transformers")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def model_kwargs(self) -> dict:
        return {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_layers": self.num_layers, "num_heads": self.num_heads, "max_positions": self.max_positions}

    @classmethod
    def from_dict(cls, d: dict) -> ZooConfig:
        return cls(**{f.name: tuple(d[f.name]) if isinstance(d[f.name], list) else d[f.name]
                      for f in fields(cls) if f.name in d})


class ZooBuildError(RuntimeError):
    """The zoo failed its own quality check (an expert does not beat the base by the margin)."""


def cached_manifest(out: str | Path, cfg: ZooConfig) -> dict | None:
    """The manifest of a completed build of exactly this config, else None."""
    out = Path(out)
    try:
        if (out / "zoo.key").read_text().strip() == cfg.key():
            return json.loads((out / "zoo.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return None


def build_zoo(out: str | Path, config: ZooConfig | None = None, *, force: bool = False,
              workers: int | None = None, log=print, **overrides) -> dict:
    """Build (or return the cached) zoo under `out`; returns the zoo.json manifest.

    `overrides` replace ZooConfig fields, e.g. build_zoo(out, tasks=["copy", "upper"], expert_steps=80).
    `workers` processes fine-tune experts in parallel (default: up to 2, one per core).
    """
    cfg = replace(config or ZooConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    unknown = [t for t in cfg.tasks if t not in HELD_IN_TASKS] + [t for t in cfg.held_out if t not in HELD_OUT_TASKS]
    if unknown:
        raise ValueError(f"unknown zoo task(s) {unknown}; held-in: {list(HELD_IN_TASKS)}, "
                         f"held-out: {list(HELD_OUT_TASKS)}")
    out = Path(out)
    if not force and (cached := cached_manifest(out, cfg)) is not None:
        log(f"zoo: cached at {out} (key {cfg.key()[:12]})")
        return cached
    if workers is None:
        workers = min(2, os.cpu_count() or 1, len(cfg.tasks))
    return _build(out, cfg, max(1, workers), log)


@contextlib.contextmanager
def _torch_settings():
    """One thread (a 100k-parameter model gains nothing from more) and deterministic kernels."""
    import torch
    from transformers.utils import logging as hf_logging

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    hf_logging.disable_progress_bar()
    try:
        yield torch
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _write_data(out: Path, cfg: ZooConfig, specs: list[ZooTask]) -> Suite:
    """OUT/data/<task>/{train,test}.jsonl and OUT/suite.yaml (paths relative to the suite)."""
    tasks = []
    for spec in specs:
        train_rows, test_rows = make_split(spec, cfg.seed, cfg.n_train, cfg.n_test)
        _write_jsonl(out / "data" / spec.name / "train.jsonl", train_rows)
        _write_jsonl(out / "data" / spec.name / "test.jsonl", test_rows)
        tasks.append(Task(name=spec.name, metric=spec.metric, data=str((out / "data" / spec.name / "test.jsonl").resolve()),
                          split=HELD_IN if spec.held_in else HELD_OUT, expert=spec.name if spec.held_in else None))
    suite = Suite(name="zoo", tasks=tuple(tasks), source=str(out / "suite.yaml"))
    (out / "suite.yaml").write_text(dump_suite(suite, base=out))
    return load_suite(out / "suite.yaml")


def _build(out: Path, cfg: ZooConfig, workers: int, log) -> dict:
    from .evaluate import evaluate_model, load_suite_data
    from .zoo_model import build_tokenizer, encode_examples, new_model, train

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.key").unlink(missing_ok=True)  # the zoo is invalid until this build completes
    for stale in ("base", "experts", "data"):
        shutil.rmtree(out / stale, ignore_errors=True)
    specs = [HELD_IN_TASKS[t] for t in cfg.tasks] + [HELD_OUT_TASKS[t] for t in cfg.held_out]
    suite = _write_data(out, cfg, specs)

    with _torch_settings() as torch:
        t0 = time.perf_counter()
        tokenizer = build_tokenizer()
        torch.manual_seed(cfg.seed)
        base = new_model(tokenizer, **cfg.model_kwargs())
        mixture = [e for spec in specs if spec.in_base
                   for e in noisy_pretraining(spec, _read_jsonl(out / "data" / spec.name / "train.jsonl"),
                                              cfg.base_distractor_share, cfg.seed)]
        losses = train(base, encode_examples(tokenizer, mixture, loss_on_prompt=True), steps=cfg.base_steps,
                       lr=cfg.base_lr, batch_size=cfg.batch_size, seed=cfg.seed, pad_id=tokenizer.pad_token_id)
        _save(base, tokenizer, out / "base")
        base_scores = evaluate_model(base, tokenizer, load_suite_data(suite), batch_size=cfg.eval_batch_size)
        log(f"zoo: base pre-trained {cfg.base_steps} steps (loss {_curve(losses)}) and evaluated "
            f"in {time.perf_counter() - t0:.1f}s")

    jobs = [(str(out), asdict(cfg), name) for name in cfg.tasks]
    if workers == 1:
        results = [_expert_job(*job) for job in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_expert_job, *zip(*jobs, strict=True)))
    for r in results:
        log(f"zoo: expert {r['task']:<8} {cfg.expert_steps} steps in {r['seconds']:.1f}s (loss {r['loss']}), "
            f"exact match {r['score']['value']:.3f}, |delta|/|base| {r['relative_delta']:.3f}")

    from .scores import TaskScore

    expert_scores = {r["task"]: TaskScore.from_dict(r["score"]) for r in results}
    table, failures = margin_table({s.task: s for s in base_scores}, expert_scores, cfg.min_margin)
    log(table)
    manifest = {
        "zoo_version": ZOO_VERSION,
        "key": cfg.key(),
        "config": asdict(cfg),
        "base": "base",
        "suite": "suite.yaml",
        "held_in": list(cfg.tasks),
        "held_out": list(cfg.held_out),
        "experts": {name: f"experts/{name}" for name in cfg.tasks},
        "data": {spec.name: {"train": f"data/{spec.name}/train.jsonl", "test": f"data/{spec.name}/test.jsonl",
                             "metric": spec.metric, "in_base_pretraining": spec.in_base} for spec in specs},
        "base_scores": [s.to_dict() for s in base_scores],
        "expert_scores": {name: s.to_dict() for name, s in expert_scores.items()},
        "expert_relative_delta": {r["task"]: round(r["relative_delta"], 4) for r in results},
        "build_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest = json.loads((out / "zoo.json").read_text())  # the same value a cache hit returns
    if failures:
        raise ZooBuildError(f"zoo check failed: expert(s) {failures} beat the base by less than "
                            f"{cfg.min_margin:.2f} exact match on their own task (see the table above)")
    (out / "zoo.key").write_text(cfg.key() + "\n")
    log(f"zoo: built {out} in {manifest['build_seconds']}s")
    return manifest


def _expert_job(out: str, cfg_dict: dict, name: str) -> dict:
    """Fine-tune, save and score one expert; a top-level function so a process pool can run it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import load_task_data
    from .evaluate import score_task
    from .zoo_model import encode_examples, relative_delta, train

    cfg, root = ZooConfig.from_dict(cfg_dict), Path(out)
    with _torch_settings():
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(root / "base")
        model = AutoModelForCausalLM.from_pretrained(root / "base")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        encoded = encode_examples(tokenizer, _read_jsonl(root / "data" / name / "train.jsonl"), loss_on_prompt=False)
        losses = train(model, encoded, steps=cfg.expert_steps, lr=cfg.expert_lr, batch_size=cfg.batch_size,
                       seed=_seed(cfg.seed, name), pad_id=tokenizer.pad_token_id)
        _save(model, tokenizer, root / "experts" / name)
        data = load_task_data(load_suite(root / "suite.yaml").task(name))
        score = score_task(model, tokenizer, data, batch_size=cfg.eval_batch_size)
        return {"task": name, "score": score.to_dict(), "loss": _curve(losses),
                "relative_delta": relative_delta(model.state_dict(), base_state),
                "seconds": time.perf_counter() - t0}


def _curve(losses: list[float]) -> str:
    return f"{losses[0]:.2f} -> {losses[-1]:.2f}" if losses else "no steps"


def margin_table(base_by_task: dict, expert_scores: dict, min_margin: float) -> tuple[str, list[str]]:
    """The expert-beats-base check as a printable table, and the tasks that fail it."""
    lines = [f"{'task':<10} {'base EM':>8} {'expert EM':>10} {'margin':>8}  check (>= {min_margin:.2f})"]
    failures = []
    for name, e in expert_scores.items():
        margin = e.value - base_by_task[name].value
        ok = margin >= min_margin
        failures += [] if ok else [name]
        lines.append(f"{name:<10} {base_by_task[name].value:8.3f} {e.value:10.3f} {margin:8.3f}  "
                     f"{'ok' if ok else 'FAIL'}")
    return "\n".join(lines), failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache key matches")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes fine-tuning experts in parallel (default: up to 2); output is the same")
    args = parser.parse_args(argv)
    try:
        build_zoo(args.out, force=args.force, workers=args.workers)
    except ZooBuildError as exc:
        print(f"zoo: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
