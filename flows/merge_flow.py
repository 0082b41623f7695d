"""The Prefect merge flow: recipe -> plan -> one task per layer unit -> atomic commit -> catalog.

A run holds its output's lock (storage.OutputLock) from before its first staged shard to its
publish: a second run of the same output waits, then finds the first one's shards in the cache.

Layer tasks are cached on everything that determines their shard (UnitJob.cache_key) with
persisted results, so a re-run, or a run restarted after a crash, recomputes only what is
missing. A unit whose cached shard is gone (its staging area was cleaned) is recomputed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

import storage
from storage.catalog import Catalog, CatalogError
from storage.uri import join
from storage.version import code_version

from .plan import Plan, check_replacing, make_plan
from .recipe import Recipe, parse_recipe, recipe_summary
from .unit import UnitJob, run_unit, share_budget

# Called as listener(unit_name, done, total, cached) when a unit finishes: the CLI's progress bar.
progress_listeners: list[Callable[[str, int, int, bool], None]] = []
# The UI's progress artifact is updated at most this often, and when the last unit is done: each
# update is a blocking API call (44 ms on the bench machine), 0.8 s of a 254M linear merge's 2.6 s
# in the flow when every one of its 19 units posted one.
PROGRESS_EVERY_S = 1.0


# Errors that a retry meets again: bad input (ValueError), and what bad input or a bug raises
# deeper down (a dtype a kernel lacks, a missing key).
_DETERMINISTIC = (ValueError, TypeError, LookupError, ArithmeticError, AttributeError, NotImplementedError)


def _transient(task, task_run, state) -> bool:
    """Retry I/O trouble (network, 5xx, throttling after botocore's own retries, a lost Dask
    worker); never what would fail the same way again (_DETERMINISTIC)."""
    try:
        state.result(raise_on_failure=True)
    except _DETERMINISTIC:
        return False
    except Exception:  # noqa: BLE001 - everything else is worth another try
        return True
    return False


@task(
    name="merge-layer",
    task_run_name="merge-layer-{unit_id}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=_transient,
    cache_key_fn=lambda ctx, params: params["job"].cache_key(),
    persist_result=True,
    result_serializer="json",
)
def merge_layer(unit_id: str, job: UnitJob) -> dict:
    return run_unit(job)


@flow(name="merge", log_prints=True)
def merge_flow(
    recipe_text: str,
    recipe_source: str = "<recipe>",
    output: str | None = None,
    catalog_path: str | None = None,
    trigger: str = "manual",
    replace: bool = False,
) -> dict:
    """Merge the experts of a recipe (YAML text) and publish the result; returns a run summary.
    `replace`: publish even where another recipe's model is (see flows.plan.check_replacing)."""
    logger = get_run_logger()
    recipe = parse_recipe(recipe_text, source=recipe_source, output=output)
    catalog = Catalog(catalog_path)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        plan = make_plan(recipe, replace=replace)
    except Exception as exc:  # bad or unreachable inputs: a failed run with no inputs, nothing staged
        run_id = catalog.start_run(
            recipe_name=recipe.name, method=recipe.method, parameters=recipe.parameters, recipe_text=recipe.text,
            base_id=None, inputs=[], code_version=code_version(), flow_run_id=_flow_run_id(), trigger=trigger,
        )
        catalog.finish_run(run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    recipe = plan.recipe  # concrete: what a `models_from` selection resolved to
    for note in plan.notes:
        logger.warning("%s", note)
    timings["plan"] = time.perf_counter() - t0
    staging = storage.staging_uri(plan.output)
    lock = storage.OutputLock(plan.output, purpose=f"merge {recipe.name!r} (flow run {_flow_run_id()})")
    run_id = None  # recorded once the lock is held: a run killed while waiting leaves no 'running' row behind
    try:
        lock.acquire(on_wait=logger.info)  # another run writing this output finishes first
        timings["lock_wait"] = lock.waited_s
        run_id = _start_run(catalog, plan, trigger)
        if storage.restore_replaced(plan.output):
            logger.warning("put back the model at %s that a killed publish had moved aside", plan.output)
        check_replacing(plan.output, recipe.name, replace)  # again: another recipe may have published while we waited
        for abandoned in catalog.begin_writing(run_id):
            logger.warning("run %s was killed while writing %s; recorded as failed", abandoned, plan.output)
        t0 = time.perf_counter()
        results, cached, unchanged = _merge_units(plan, staging, logger)
        timings["merge"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lock.check()
        if unchanged is None:
            published = storage.publish_checkpoint(
                plan.output, staging, [_shard_info(r) for r in results],
                config_source=plan.reference, dtype=plan.dtype, sidecar=_sidecar(plan, results),
            )
        else:  # every layer cached, and the output already is this model: no copy, no new version
            published = unchanged
            storage.abort_staging(staging)
            logger.info("%s already holds this model (same recipe, inputs and shards); not published again",
                        plan.output)
        timings["commit"] = time.perf_counter() - t0
        model_id = catalog.complete_run(
            run_id, published.uri, name=recipe.name, identity=published.identity,
            model_type=published.model_type, param_count=published.param_count,
            dtype=str(plan.dtype).removeprefix("torch."), metadata={"recipe_digest": recipe.digest}, timings=timings,
        )
    except BaseException as exc:
        # A failure cleans up its staging area (never one another run owns); an interrupt (Ctrl-C,
        # SIGTERM from an eviction or a cancel) keeps the finished shards for the re-run to resume.
        if isinstance(exc, Exception) and lock.still_held():
            storage.abort_staging(staging)
        try:
            run_id = run_id or _start_run(catalog, plan, trigger)
            catalog.finish_run(run_id, status="failed", error=f"{type(exc).__name__}: {exc}", timings=timings)
        except CatalogError as record:  # e.g. a run that lost its lock was failed by the new holder
            logger.warning("run %s not recorded as failed: %s", run_id, record)
        raise
    finally:
        lock.release()
    summary = {
        "run_id": run_id, "model_id": model_id, "output": published.uri, "identity": published.identity,
        "units": len(plan.units), "cached": sorted(cached),
        "computed": sorted(r["unit"] for r in results if r["unit"] not in cached), "timings": timings,
        "read_cache": _read_cache_counts(plan, results, cached),
    }
    if recipe.evaluate:
        from .evaluate_flow import evaluate_flow

        summary["evaluation"] = evaluate_flow(
            published.uri, recipe.evaluate["suite"], catalog_path=catalog_path, base=recipe.base,
            experts=recipe.evaluate["experts"] or None, device=recipe.device,
        )
    create_table_artifact(
        key="merge-summary",
        table=[{"unit": r["unit"], "shard": r["filename"], "bytes": r["size"], "sha256": r["sha256"][:16],
                "cached": r["unit"] in cached} for r in results],
        description=f"{recipe.method} merge of {len(plan.experts)} experts into {published.uri}",
    )
    logger.info("%s %s (%d units, %d from cache)", "unchanged:" if unchanged else "published", published.uri,
                len(plan.units), len(cached))
    return summary


def _merge_units(plan: Plan, staging: str, logger) -> tuple[list[dict], set[str], storage.Checkpoint | None]:
    """Run every unit's task; make sure each result's shard is really staged. Returns the results,
    the units taken from the cache, and the published output if it already is this merge's model
    (then nothing is staged)."""
    jobs = {j.unit.name: j for j in share_budget([UnitJob.from_plan(plan, u, staging) for u in plan.units])}
    artifact = create_progress_artifact(progress=0.0, key="merge-progress", description="layer units merged")
    futures = {merge_layer.submit(unit_id=name, job=job): name for name, job in jobs.items()}
    results: dict[str, dict] = {}
    cached: set[str] = set()
    posted = time.monotonic()
    for done, fut in enumerate(as_completed(list(futures)), start=1):
        name = futures[fut]
        try:
            results[name] = fut.result()
        except BaseException:
            _stop_siblings(futures)
            raise
        if fut.state.name == "Cached":
            cached.add(name)
        if done == len(futures) or time.monotonic() - posted >= PROGRESS_EVERY_S:
            update_progress_artifact(artifact, progress=100.0 * done / len(futures))
            posted = time.monotonic()
        for listener in progress_listeners:
            listener(name, done, len(futures), name in cached)
    ordered = [results[u.name] for u in plan.units]
    if len(cached) == len(results) and (same := _published_already(plan, ordered)) is not None:
        return ordered, cached, same
    gone = [name for name in sorted(cached) if not _restage(results[name], plan, staging)]
    if gone:  # a cache hit only counts if its shard still exists; the others merge again, side by side
        logger.warning("cached shards of %d units are gone (%s); recomputing them", len(gone), ", ".join(gone[:5]))
        cached.difference_update(gone)
        again = {merge_layer.with_options(refresh_cache=True).submit(unit_id=n, job=jobs[n]): n for n in gone}
        for fut in as_completed(list(again)):
            try:
                results[again[fut]] = fut.result()
            except BaseException:
                _stop_siblings(again)
                raise
    return [results[u.name] for u in plan.units], cached, None


def _published_already(plan: Plan, results: list[dict]) -> storage.Checkpoint | None:
    """The output, if it is complete and its mergeline.json records this recipe (digest), these
    inputs (identities) and these shards (names and SHA-256): re-publishing it would copy the same
    bytes and, locally, give them a new identity, so a new catalog version of the same model."""
    if not storage.is_complete(plan.output):
        return None
    published = storage.open_checkpoint(plan.output)
    try:
        sidecar = json.loads(published.read_bytes(storage.SIDECAR_NAME))
    except (storage.CheckpointError, ValueError):
        return None
    mine = _sidecar(plan, results)
    same = (sidecar.get("recipe", {}).get("digest") == mine["recipe"]["digest"]
            and [(i.get("role"), i.get("identity")) for i in sidecar.get("inputs", [])]
            == [(i["role"], i["identity"]) for i in mine["inputs"]]
            and [(x.get("filename"), x.get("sha256")) for x in sidecar.get("shards", [])]
            == [(x["filename"], x["sha256"]) for x in mine["shards"]])
    return published if same else None


def _stop_siblings(futures) -> None:
    """After one unit failed: cancel the units not started and wait for the running ones, so that
    none writes into staging after the flow has cleaned it up and released the output's lock."""
    for fut in futures:
        wrapped = getattr(fut, "wrapped_future", None)  # concurrent.futures / dask: cancel if pending
        if wrapped is not None:
            wrapped.cancel()
    for fut in futures:
        try:
            fut.wait()
        except Exception:  # cancelled, or failed too: either way it writes nothing more
            pass


def _restage(result: dict, plan: Plan, staging: str) -> bool:
    """The shard is in staging, or is copied back there from an identical published model. Every
    recipe with this output stages into the same folder, so a staged shard only counts if it is
    the one this result describes (another recipe's killed run may have left its own there)."""
    staged = storage.staged_shard(staging, result["filename"])
    if staged and (staged.sha256, staged.size) == (result["sha256"], result["size"]):
        result["etag"] = staged.etag  # what publish checks is still there
        return True
    if not storage.is_complete(plan.output):
        return False
    published = storage.open_checkpoint(plan.output)
    shards = json.loads(published.read_bytes(storage.SIDECAR_NAME)).get("shards", [])
    if {"filename": result["filename"], "sha256": result["sha256"]} not in [
        {"filename": s["filename"], "sha256": s["sha256"]} for s in shards
    ]:
        return False
    result["etag"] = storage.restage_shard(join(plan.output, result["filename"]), _shard_info(result)).etag
    return True


def _read_cache_counts(plan: Plan, results: list[dict], cached: set[str]) -> dict[str, int] | None:
    """What the layer units merged in this run read through the read cache (MERGELINE_CACHE_DIR),
    summed; None without one (the plan opens every input with the same cache). Units taken from
    Prefect's cache read nothing; only S3 inputs go through it."""
    if plan.reference.cache is None:
        return None
    total = storage.CacheStats().as_dict()
    for r in results:
        if r["unit"] not in cached and r.get("read_cache"):
            for k, v in r["read_cache"].items():
                total[k] += v
    return total


def _shard_info(r: dict) -> storage.ShardInfo:
    return storage.ShardInfo(r["filename"], r["uri"], r["size"], r["sha256"], tuple(r["tensors"]), r.get("etag"))


def _sidecar(plan: Plan, results: list[dict]) -> dict:
    return {
        "recipe": recipe_summary(plan.recipe),
        "recipe_text": plan.recipe.text,
        "inputs": [
            {"role": role, "uri": c.uri, "identity": c.identity, "files": {f: i.as_dict() for f, i in c.files.items()}}
            for role, c in [("base", plan.base)] * bool(plan.base) + [("expert", e) for e in plan.experts]
        ],
        "shards": [{k: r[k] for k in ("filename", "sha256", "size", "unit")} for r in results],
        "code_version": code_version(),
        "flow_run_id": _flow_run_id(),
        "created_at": datetime.now(UTC).isoformat(),
    }


def _start_run(catalog: Catalog, plan: Plan, trigger: str) -> str:
    r = plan.recipe

    def register(ckpt, kind: str) -> str:  # idempotent: a known (uri, identity) keeps its id and kind
        return catalog.register_checkpoint(
            ckpt.uri, kind=kind, name=_name_of(ckpt.uri), identity=ckpt.identity, model_type=ckpt.model_type,
            param_count=ckpt.param_count, dtype=ckpt.config.get("torch_dtype") or ckpt.config.get("dtype"),
        )

    base_id = register(plan.base, "base") if plan.base else None
    inputs = [
        {"checkpoint_id": register(e, "expert"), "weight": w, "parameters": m.parameters}
        for e, w, m in zip(plan.experts, r.weights, r.models)
    ]
    return catalog.start_run(
        recipe_name=r.name, method=r.method, parameters=r.parameters, recipe_text=r.text, base_id=base_id,
        inputs=inputs, code_version=code_version(), flow_run_id=_flow_run_id(),
        trigger=trigger, target_uri=plan.output,
    )


def _flow_run_id() -> str | None:
    return str(flow_run.id) if flow_run.id else None


def _name_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def _check_scheduler(address: str, timeout: float = 15.0) -> None:
    """A Dask comm handshake with `address`, bounded: a port that answers but is not a Dask
    scheduler (a web server) would otherwise hang the merge at its start, past Dask's own timeout."""
    import asyncio

    from distributed.comm import connect

    async def probe() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
        await comm.close()

    try:
        asyncio.get_running_loop()
        return  # called from async code: Prefect's own connection attempt has to do
    except RuntimeError:
        pass
    try:
        _check_reachable(address)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no Dask scheduler at {address} ({type(exc).__name__}: {exc}); check --address") from None
    try:
        asyncio.run(probe())
    except (OSError, TimeoutError, ValueError) as exc:
        raise ValueError(f"no Dask scheduler answered at {address} within {timeout:.0f} s "
                         f"({type(exc).__name__}: {exc}); check --address") from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connect first: Dask's connect retries a refused port until its timeout; a refusal
    or an unknown host is an answer at once."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme in ("tcp", "tls"):
        with socket.create_connection(parse_host_port(location), timeout=timeout):
            pass


def run_merge(
    recipe: Recipe,
    *,
    runner: str = "threads",
    address: str | None = None,
    workers: int = 4,
    catalog_path: str | None = None,
    trigger: str = "manual",
    replace: bool = False,
) -> dict:
    """Run the merge flow with the chosen task runner (threads on this machine, or a Dask cluster)."""
    if runner == "dask":
        if not address:
            raise ValueError("--runner dask needs --address tcp://HOST:PORT of a running Dask scheduler")
        from prefect_dask import DaskTaskRunner

        _check_scheduler(address)
        task_runner = DaskTaskRunner(address=address)
    elif runner == "threads":
        task_runner = ThreadPoolTaskRunner(max_workers=workers)
    else:
        raise ValueError(f"unknown runner {runner!r}; use 'threads' or 'dask'")
    configured = merge_flow.with_options(task_runner=task_runner, flow_run_name=f"merge-{recipe.name}")
    return configured(recipe.text, recipe.source, recipe.output, catalog_path, trigger, replace)
