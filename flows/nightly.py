"""The nightly merge: every configured recipe over the current experts, unless nothing changed.

For each recipe: resolve `models_from` to the experts complete right now, open every input from
its headers, and compare with the recipe's last successful run in the catalog (same concrete
recipe text, same base and experts by URI and identity, same code version, and the model it
published still there, unchanged). Identical: a run with status 'skipped' is recorded and no
layer is read. Otherwise the merge runs (in-process as a subflow, or on the `merge` deployment
with run_deployment when `merge_deployment` is given); the merge flow evaluates the model when
the recipe has `evaluate:` and records everything in the catalog.

`merge_if_changed` is shared with the watcher (flows/watcher.py).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

import storage
from storage import Checkpoint
from storage.catalog import Catalog
from storage.errors import CheckpointError, StorageError
from storage.uri import validate_output_uri
from storage.version import code_version

from .merge_flow import run_merge
from .recipe import Recipe
from .selection import ExpertScan, load_recipes, resolve_recipe


class ProblemsFound(ValueError):
    """A watcher or nightly run did all it could and fails listing what it could not do (recipes
    that do not load, merges that failed): things a user fixes, so no traceback on the console.
    `summary` is what the run would have returned: the CLI still prints what did succeed."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


def open_inputs(recipe: Recipe) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """Base and experts of a concrete recipe, opened from their headers (identities pinned)."""
    uris = list(dict.fromkeys(([recipe.base] if recipe.base else []) + recipe.inputs))
    with ThreadPoolExecutor(max_workers=min(8, len(uris))) as pool:
        opened = dict(zip(uris, pool.map(storage.open_checkpoint, uris)))
    return (opened[recipe.base] if recipe.base else None), [opened[u] for u in recipe.inputs]


def _key(uri: str | None, identity: str | None) -> tuple[str, str | None] | None:
    return None if not uri else (uri.rstrip("/"), identity)


def unchanged_since_last(catalog: Catalog, recipe: Recipe, base: Checkpoint | None,
                         experts: list[Checkpoint]) -> dict | None:
    """The recipe's last successful run when merging now would make the same model again, else None."""
    last = catalog.last_successful_run(recipe.name)
    if last is None:
        return None
    output = validate_output_uri(recipe.output)
    same = (
        last["recipe_digest"] == recipe.digest
        and last["code_version"] == code_version()
        and _key(last["base_uri"], last["base_identity"]) == (_key(base.uri, base.identity) if base else None)
        and [_key(i["uri"], i["identity"]) for i in last["inputs"]] == [_key(e.uri, e.identity) for e in experts]
        and (last["output_uri"] or "").rstrip("/") == output.rstrip("/")
    )
    if not same:
        return None
    try:  # the model it published must still be there, as it was (a deleted or replaced one is re-made)
        published = storage.open_checkpoint(output)
    except (CheckpointError, StorageError, FileNotFoundError):
        return None
    return last if published.identity == last["output_identity"] else None


def _name_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def record_skipped(catalog: Catalog, recipe: Recipe, base: Checkpoint | None, experts: list[Checkpoint],
                   trigger: str) -> str:
    """A 'skipped' run with the inputs it would have merged (registered as the merge flow does)."""
    def register(ck: Checkpoint, kind: str) -> str:
        return catalog.register_checkpoint(
            ck.uri, kind=kind, name=_name_of(ck.uri), identity=ck.identity, model_type=ck.model_type,
            param_count=ck.param_count, dtype=str(ck.config.get("torch_dtype") or ck.config.get("dtype")),
        )

    run_id = catalog.start_run(
        recipe_name=recipe.name, method=recipe.method, parameters=recipe.parameters, recipe_text=recipe.text,
        base_id=register(base, "base") if base else None,
        inputs=[{"checkpoint_id": register(e, "expert"), "weight": w, "parameters": m.parameters}
                for e, w, m in zip(experts, recipe.weights, recipe.models)],
        code_version=code_version(), flow_run_id=str(flow_run.id) if flow_run.id else None, trigger=trigger,
    )
    catalog.finish_run(run_id, status="skipped", timings={})
    return run_id


def inputs_digest(recipe: Recipe, base: Checkpoint | None, experts: list[Checkpoint]) -> str:
    """What a merge of this recipe would be made of: recipe text, inputs' identities, code version."""
    data = [recipe.digest, code_version(), _key(base.uri, base.identity) if base else None,
            [_key(e.uri, e.identity) for e in experts], recipe.output]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()


def merge_if_changed(
    recipe: Recipe,
    *,
    trigger: str,
    catalog_path: str | None = None,
    scans: dict[str, ExpertScan] | None = None,
    record_skip: bool = True,
    merge_deployment: str | None = None,
    idempotency_scope: str = "",
    runner: str = "threads",
    address: str | None = None,
    workers: int = 4,
) -> dict:
    """Resolve, compare with the last successful run, then skip (recording it) or merge.

    With merge_deployment ("flow/deployment"), the merge is a run of that deployment created with
    run_deployment (returns at once; the run's idempotency key is made of idempotency_scope and the
    inputs, so the same inputs never start two runs); without it, the merge runs here as a subflow.
    """
    concrete = resolve_recipe(recipe, scans)
    base, experts = open_inputs(concrete)
    catalog = Catalog(catalog_path)
    used = [{"uri": e.uri, "identity": e.identity} for e in experts]
    out = {"recipe": recipe.name, "source": recipe.source, "inputs": used, "output": concrete.output}
    last = unchanged_since_last(catalog, concrete, base, experts)
    if last is not None:
        out.update(action="skipped", same_as_run=last["id"], output=last["output_uri"])
        if record_skip:
            out["run_id"] = record_skipped(catalog, concrete, base, experts, trigger)
        return out
    if merge_deployment:
        run = run_deployment(
            merge_deployment, timeout=0, flow_run_name=f"merge-{recipe.name}",
            idempotency_key=f"mergeline:{idempotency_scope}:{inputs_digest(concrete, base, experts)}",
            parameters={"recipe_text": concrete.text, "recipe_source": concrete.source, "output": concrete.output,
                        "trigger": trigger, **({"catalog_path": catalog_path} if catalog_path else {})},
        )
        out.update(action="submitted", flow_run_id=str(run.id), flow_run_name=run.name, deployment=merge_deployment)
        return out
    summary = run_merge(concrete, runner=runner, address=address, workers=workers, catalog_path=catalog_path,
                        trigger=trigger)
    out.update(action="merged", **{k: summary[k] for k in ("run_id", "model_id", "output", "identity")},
               computed=len(summary["computed"]), cached=len(summary["cached"]))
    return out


@flow(name="nightly-merge", log_prints=True)
def nightly_merge(
    recipes: list[str] | str,
    catalog_path: str | None = None,
    merge_deployment: str | None = None,
    runner: str = "threads",
    address: str | None = None,
    workers: int = 4,
) -> dict:
    """Merge each recipe (files, directories or S3 prefixes of recipe YAML) whose inputs changed.

    Every recipe is tried; the run fails at the end if any recipe could not be loaded or merged.
    """
    logger = get_run_logger()
    loaded, errors = load_recipes(recipes)
    for e in errors:
        logger.error("recipe not loaded: %s", e)
    scans: dict[str, ExpertScan] = {}
    results = []
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    for recipe in loaded:
        try:
            result = merge_if_changed(
                recipe, trigger="nightly", catalog_path=catalog_path, scans=scans, record_skip=True,
                merge_deployment=merge_deployment, idempotency_scope=f"nightly-{day}", runner=runner,
                address=address, workers=workers,
            )
        except Exception as exc:  # noqa: BLE001 - one broken recipe must not stop the others
            logger.error("%s: %s: %s", recipe.name, type(exc).__name__, exc)
            errors.append(f"{recipe.name}: {type(exc).__name__}: {exc}")
            results.append({"recipe": recipe.name, "source": recipe.source, "action": "failed", "error": str(exc)})
            continue
        logger.info("%s: %s (%s)", recipe.name, result["action"], ", ".join(_label(i) for i in result["inputs"]))
        results.append(result)
    summary = {"recipes": results, "errors": errors}
    if errors:
        raise ProblemsFound(f"nightly merge: {len(errors)} problem(s): " + "; ".join(errors), summary)
    return summary


def _label(i: dict) -> str:
    return f"{i['uri'].rsplit('/', 1)[-1]}@{i['identity'][:8]}"
