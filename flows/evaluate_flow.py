"""The Prefect evaluate flow: score a model on a suite, normalise against its experts and base,
and record every score in the catalog.

References come from the catalog when not given: the base of the run that made the model, and
its input experts. Held-in tasks are the tasks of the experts the model was merged from (the
suite names each task's expert), as in the paper; other experts' tasks are not scored. Each model's scoring is a
cached task keyed on the checkpoint's identity and the suite data's digests, so the base and the
experts are scored once, however many merged models are compared with them.
"""

from __future__ import annotations

import hashlib
import json
import tempfile

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

import storage
from evaluation import HELD_IN, HELD_OUT, TaskScore, load_suite, normalise
from evaluation.evaluate import load_suite_data
from storage.catalog import Catalog
from storage.version import code_version

from .merge_flow import _transient


def _score_key(ctx, params) -> str:
    key = [params["identity"], params["tasks"], params["task_digests"], code_version()]
    return "evaluate-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def task_digests(suite_obj, data_digests: dict[str, str]) -> dict[str, str]:
    """Per task, a digest of everything that decides its score: its definition (metric, split,
    generation budget, stop strings, data URI) and its data's content."""
    return {t.name: hashlib.sha256(f"{t!r}\0{data_digests[t.name]}".encode()).hexdigest() for t in suite_obj.tasks}


@task(name="evaluate-model", task_run_name="evaluate-{label}", cache_key_fn=_score_key, persist_result=True,
      result_serializer="json", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def score_model(label: str, uri: str, identity: str, suite: str, tasks: list[str], task_digests: dict[str, str],
                device: str = "cpu", batch_size: int = 32) -> list[dict]:
    """Absolute scores of one checkpoint (any URI) on the named tasks of a suite. task_digests
    (definition and data of each task) are for the cache key: a task scored differently is a miss."""
    from transformers.utils import logging as hf_logging

    from evaluation import evaluate_checkpoint

    hf_logging.disable_progress_bar()  # a bar per model load drowns the flow's own log
    ckpt = storage.open_checkpoint(uri)
    if ckpt.identity != identity:
        raise storage.CheckpointError(f"{uri} changed since the evaluation was planned; run it again")
    with tempfile.TemporaryDirectory(prefix="mergeline-eval-") as tmp:
        local = storage.local_copy(ckpt, tmp)
        scores = evaluate_checkpoint(local, suite, device=device, batch_size=batch_size, tasks=tasks)
    return [s.to_dict() for s in scores]


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    model: str,
    suite: str,
    catalog_path: str | None = None,
    base: str | None = None,
    experts: dict[str, str] | None = None,
    device: str = "auto",
    batch_size: int = 32,
) -> dict:
    """Score `model` (URI or catalog reference) on `suite` (YAML, local or s3://) and record it."""
    logger = get_run_logger()
    catalog = Catalog(catalog_path)
    suite_obj = load_suite(suite)
    digests = {d.task.name: d.digest for d in load_suite_data(suite_obj)}  # validates all data first
    definitions = task_digests(suite_obj, digests)
    target = _checkpoint(catalog, model)
    base_uri = base or catalog.base_of(target["id"])
    held_out = [t.name for t in suite_obj.split(HELD_OUT)]
    if held_out and not base_uri:
        raise ValueError(f"{model}: no base model to normalise held-out tasks by; give --base URI "
                         "(in a recipe: base_model)")
    expert_uris = _experts_for(catalog, target, suite_obj, experts, suite)
    held_in = [t for name in expert_uris for t in suite_obj.experts()[name]]
    device = _device(device)

    def submit(label: str, ckpt: storage.Checkpoint, tasks: list[str]):
        return score_model.submit(label=label, uri=ckpt.uri, identity=ckpt.identity, suite=suite, tasks=tasks,
                                  task_digests={t: definitions[t] for t in tasks}, device=device,
                                  batch_size=batch_size)

    target_ckpt = storage.open_checkpoint(target["uri"])
    futures = {"model": submit(target["label"], target_ckpt, [t for t in suite_obj.names() if t in held_in + held_out])}
    refs = {}
    if held_out:
        refs["base"] = storage.open_checkpoint(base_uri)
        futures["base"] = submit("base", refs["base"], held_out)
    for name, uri in expert_uris.items():
        refs[name] = storage.open_checkpoint(uri)
        futures[name] = submit(name, refs[name], suite_obj.experts()[name])
    results = {k: [TaskScore.from_dict(d) for d in f.result()] for k, f in futures.items()}

    expert_scores = [s for name in expert_uris for s in results[name]]
    normalised = normalise(results["model"], expert_scores, results.get("base", []))
    run_id = str(flow_run.id) if flow_run.id else None
    labels = {"base": base_uri, **expert_uris}
    records = []
    for s in normalised.scores:
        against = suite_obj.task(s.task).expert if s.split == HELD_IN else "base"
        records.append(dict(
            checkpoint_id=target["id"], suite=suite_obj.name, task=s.task, split=s.split, metric=s.metric,
            value=s.value, normalized_value=s.normalised, normalized_against=f"{against} ({labels[against]})",
            num_examples=_count(results["model"], s.task), data_digest=digests[s.task], flow_run_id=run_id,
        ))
    for who, ckpt in refs.items():  # the references' own absolute scores, for `catalog best` and later runs
        ref_id = catalog.register_checkpoint(ckpt.uri, kind="base" if who == "base" else "expert",
                                             name=_name(ckpt.uri), identity=ckpt.identity,
                                             model_type=ckpt.model_type, param_count=ckpt.param_count)
        records += [dict(checkpoint_id=ref_id, suite=suite_obj.name, task=r.task, split=r.split, metric=r.metric,
                         value=r.value, num_examples=r.num_examples, data_digest=r.data_digest, flow_run_id=run_id)
                    for r in results[who]]
    catalog.record_evaluations(records)

    summary = {
        "model": target["uri"], "model_id": target["id"], "suite": suite_obj.name,
        "held_in": normalised.average(HELD_IN), "held_out": normalised.average(HELD_OUT),
        "scores": [s.__dict__ for s in normalised.scores],
    }
    create_table_artifact(
        key="evaluation", description=f"{target['label']} on {suite_obj.name}",
        table=[{"task": s.task, "split": s.split, "metric": s.metric, "value": round(s.value, 4),
                "reference": round(s.reference, 4), "normalised": s.normalised} for s in normalised.scores],
    )
    logger.info("%s: held-in %s, held-out %s", target["label"], _fmt(summary["held_in"]), _fmt(summary["held_out"]))
    return summary


def _checkpoint(catalog: Catalog, ref: str) -> dict:
    """The catalog entry for a model reference; a URI not yet in the catalog is registered."""
    found = catalog.find_checkpoint(ref)
    if found is None:
        if not (ref.startswith("s3://") or "/" in ref):
            raise ValueError(f"no model {ref!r} in catalog {catalog.path}; give its URI")
        ckpt = storage.open_checkpoint(ref)
        kind = "merged" if _written_by_mergeline(ckpt) else "expert"
        catalog.register_checkpoint(ckpt.uri, kind=kind, name=_name(ckpt.uri), identity=ckpt.identity,
                                    model_type=ckpt.model_type, param_count=ckpt.param_count)
        found = catalog.find_checkpoint(ckpt.uri)
    return found


def _written_by_mergeline(ckpt: storage.Checkpoint) -> bool:
    try:
        ckpt.read_bytes(storage.SIDECAR_NAME)
    except storage.CheckpointError:
        return False
    return True


def _experts_for(catalog: Catalog, target: dict, suite_obj, given: dict[str, str] | None, suite: str) -> dict[str, str]:
    """The experts whose tasks are held-in for this model: as in the paper, those it was merged from.

    Given explicitly: those of them the suite names. Otherwise the producing run's inputs that the
    suite names, or, for a model no run produced (an expert scored alone), every expert of the suite.
    """
    named = suite_obj.experts()
    if given:
        unknown = sorted(set(given) - set(named))
        if unknown:
            raise ValueError(f"suite {suite} has no tasks for expert(s) {', '.join(unknown)}; its experts are "
                             f"{', '.join(sorted(named))}")
        return dict(given)
    made = catalog.show(target["id"]).get("produced_by")
    if made:
        inputs = {_name(i["uri"]): i["uri"] for i in made["inputs"]}
        return {n: inputs[n] for n in named if n in inputs}
    return {n: _uri_of(catalog, n, suite) for n in named}


def _uri_of(catalog: Catalog, expert: str, suite: str) -> str:
    found = catalog.find_checkpoint(expert)
    if found is None:
        raise ValueError(f"suite {suite} normalises by expert {expert!r}, which is not in catalog "
                         f"{catalog.path}; give --expert {expert}=URI (in a recipe: evaluate.experts)")
    return found["uri"]


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _count(scores: list[TaskScore], task: str) -> int:
    return next(s.num_examples for s in scores if s.task == task)


def _device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device here (use --device auto or cpu)")
    return "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
