"""An offline model zoo built from nothing but code: a tiny Llama base, one expert per task, a suite.

    python -m evaluation.zoo OUT_DIR [--force]

The base is pre-trained briefly on a mixture of every task (held-in and held-out), so it knows
the prompt format and a little of each skill; each expert is a short fine-tune of the base on
its own task, so expert deltas are small and merging them is meaningful. The build checks that
every expert beats the base on its own task by `min_margin` exact match and fails loudly if not.

Deterministic (fixed seeds, deterministic algorithms) and cached: OUT/zoo.key holds a digest of
the builder version and config, written last; a second call with the same key returns at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .suites import Suite, dump_suite
from .tasks import HELD_IN, HELD_OUT, Task
from .zoo_tasks import HELD_IN_TASKS, HELD_OUT_TASKS, ZooTask, make_split, pretraining_examples, training_text

ZOO_VERSION = "1"  # bump when the builder's output changes for the same config
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "".join(chr(c) for c in range(32, 127))  # printable ASCII, one token per character


@dataclass(frozen=True)
class ZooConfig:
    tasks: tuple[str, ...] = tuple(HELD_IN_TASKS)
    held_out: tuple[str, ...] = tuple(HELD_OUT_TASKS)
    seed: int = 0
    n_train: int = 2000
    n_test: int = 150
    base_steps: int = 600
    expert_steps: int = 250
    batch_size: int = 64
    base_lr: float = 3e-3
    expert_lr: float = 2e-3
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 192
    max_positions: int = 64
    min_margin: float = 0.30  # expert exact match minus base exact match, on the expert's task
    eval_batch_size: int = 256
    extra: dict = field(default_factory=dict)

    def key(self) -> str:
        from importlib.metadata import version  # not `import torch`: a cache hit must be instant

        blob = json.dumps({"version": ZOO_VERSION, "config": asdict(self), "torch": version("torch"),
                           "transformers": version("transformers")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


class ZooBuildError(RuntimeError):
    """The zoo failed its own quality check (an expert does not beat the base by the margin)."""


def build_tokenizer():
    """A character-level PreTrainedTokenizerFast: BOS prepended, no merges, Fuse decoder."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(list(SPECIALS))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=128)


def new_model(cfg: ZooConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def encode_examples(tokenizer, examples: list[dict], *, loss_on_prompt: bool) -> list[tuple[list[int], int]]:
    """(token ids with BOS and EOS, index of the first token that carries loss) per example."""
    pairs = [training_text(e) for e in examples]
    ctx = tokenizer([c for c, _ in pairs], add_special_tokens=True)["input_ids"]
    tgt = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    return [(c + t + [tokenizer.eos_token_id], 1 if loss_on_prompt else len(c)) for c, t in zip(ctx, tgt, strict=True)]


def train(model, encoded: list[tuple[list[int], int]], *, steps: int, lr: float, batch_size: int,
          seed: int, pad_id: int) -> list[float]:
    """AdamW with linear warmup + cosine decay on random batches; returns the loss curve."""
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        batch = [encoded[i] for i in idx]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (seq, start) in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, start:len(seq)] = torch.tensor(seq[start:])
            mask[row, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def cached_manifest(out: str | Path, cfg: ZooConfig) -> dict | None:
    out = Path(out)
    try:
        if (out / "zoo.key").read_text().strip() == cfg.key():
            return json.loads((out / "zoo.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return None


def build_zoo(out: str | Path, config: ZooConfig | None = None, *, force: bool = False, log=print,
              **overrides) -> dict:
    """Build (or return the cached) zoo under `out`; returns the zoo.json manifest.

    `overrides` replace ZooConfig fields, e.g. build_zoo(out, tasks=("copy", "upper"), expert_steps=80).
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
    return _build(out, cfg, log)


def _build(out: Path, cfg: ZooConfig, log) -> dict:
    import torch

    from .evaluate import evaluate_model, load_suite_data

    t_start = time.perf_counter()
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.key").unlink(missing_ok=True)  # invalid until this build completes
    for stale in ("base", "experts", "data"):
        shutil.rmtree(out / stale, ignore_errors=True)

    specs: list[ZooTask] = [HELD_IN_TASKS[t] for t in cfg.tasks] + [HELD_OUT_TASKS[t] for t in cfg.held_out]
    train_sets, suite_tasks = {}, []
    for spec in specs:
        train_rows, test_rows = make_split(spec, cfg.seed, cfg.n_train, cfg.n_test)
        _write_jsonl(out / "data" / spec.name / "train.jsonl", train_rows)
        _write_jsonl(out / "data" / spec.name / "test.jsonl", test_rows)
        train_sets[spec.name] = train_rows
        suite_tasks.append(Task(name=spec.name, metric=spec.metric,
                                data=str((out / "data" / spec.name / "test.jsonl").resolve()),
                                split=HELD_IN if spec.held_in else HELD_OUT,
                                expert=spec.name if spec.held_in else None))
    suite = Suite(name="zoo", tasks=tuple(suite_tasks), source=str(out / "suite.yaml"))
    (out / "suite.yaml").write_text(dump_suite(suite, base=out))
    data = {d.task.name: d for d in load_suite_data(suite)}

    tokenizer = build_tokenizer()
    torch.manual_seed(cfg.seed)
    base = new_model(cfg, tokenizer)
    mixture = [e for spec in specs for e in pretraining_examples(spec, cfg.seed, cfg.n_train)]
    t0 = time.perf_counter()
    base_losses = train(base, encode_examples(tokenizer, mixture, loss_on_prompt=True), steps=cfg.base_steps,
                        lr=cfg.base_lr, batch_size=cfg.batch_size, seed=cfg.seed, pad_id=tokenizer.pad_token_id)
    log(f"zoo: base pre-trained {cfg.base_steps} steps in {time.perf_counter() - t0:.1f}s "
        f"(loss {base_losses[0]:.2f} -> {base_losses[-1]:.2f})")
    _save(base, tokenizer, out / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_scores = evaluate_model(base, tokenizer, data.values(), batch_size=cfg.eval_batch_size)

    expert_scores, expert_dirs = {}, {}
    for i, name in enumerate(cfg.tasks):
        t0 = time.perf_counter()
        expert = new_model(cfg, tokenizer)
        expert.load_state_dict(base_state)
        losses = train(expert, encode_examples(tokenizer, train_sets[name], loss_on_prompt=False),
                       steps=cfg.expert_steps, lr=cfg.expert_lr, batch_size=cfg.batch_size,
                       seed=cfg.seed + 1 + i, pad_id=tokenizer.pad_token_id)
        expert_dirs[name] = out / "experts" / name
        _save(expert, tokenizer, expert_dirs[name])
        [expert_scores[name]] = evaluate_model(expert, tokenizer, [data[name]], batch_size=cfg.eval_batch_size)
        log(f"zoo: expert {name:<8} {cfg.expert_steps} steps in {time.perf_counter() - t0:.1f}s "
            f"(loss {losses[0]:.2f} -> {losses[-1]:.2f}), exact match {expert_scores[name].value:.3f}")

    base_by_task = {s.task: s for s in base_scores}
    table, failures = margin_table(base_by_task, expert_scores, cfg.min_margin)
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
                             "metric": spec.metric} for spec in specs},
        "base_scores": [s.to_dict() for s in base_scores],
        "expert_scores": {name: s.to_dict() for name, s in expert_scores.items()},
        "build_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if failures:
        raise ZooBuildError(f"zoo check failed: expert(s) {failures} beat the base by less than "
                            f"{cfg.min_margin:.2f} exact match on their own task (see table above)")
    (out / "zoo.key").write_text(cfg.key() + "\n")
    log(f"zoo: built {out} in {manifest['build_seconds']}s")
    return manifest


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
    args = parser.parse_args(argv)
    try:
        build_zoo(args.out, force=args.force)
    except ZooBuildError as exc:
        print(f"zoo: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
