"""`mergeline merge` and `mergeline plan`."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

MERGE_EXAMPLE = """example:
  mergeline merge recipe.yaml --output s3://models/merged/soup-v1
  mergeline merge recipe.yaml --runner dask --address tcp://10.0.0.5:8786

The recipe is mergekit's YAML (merge_method, base_model, models, parameters, dtype) plus
mergeline's keys (name, output, seed, device, evaluate, models_from). Inputs and output are local paths or
s3:// URIs; S3 is configured the way boto3 is (AWS_PROFILE, AWS_ENDPOINT_URL, ...)."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge the experts of a recipe and publish the model",
        description="Plan, merge layer by layer as Prefect tasks (cached, retried), publish atomically, "
        "and record the run in the catalog.",
        epilog=MERGE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--output", metavar="URI", help="where to publish the merged model (overrides the recipe's 'output')")
    p.add_argument("--runner", choices=["threads", "dask"], default="threads",
                   help="where layer tasks run: a thread pool here (default) or a Dask cluster")
    p.add_argument("--address", metavar="tcp://HOST:PORT", help="Dask scheduler address (with --runner dask)")
    p.add_argument("--workers", type=int, default=4, metavar="N",
                   help="threads merging layers at once with --runner threads (default: 4)")
    p.add_argument("--catalog", metavar="PATH", help="catalog DuckDB file (default: $MERGELINE_CATALOG or the user data dir)")
    p.add_argument("--trigger", default="manual", choices=["manual", "nightly", "new-expert"], help=argparse.SUPPRESS)
    p.add_argument("--replace", action="store_true",
                   help="publish even where the output holds another recipe's model (a recipe always replaces its own)")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(run=_merge)

    p = sub.add_parser(
        "plan", help="validate a recipe and its inputs and show the layer plan, merging nothing",
        description="Read every input's headers, check that they can be merged, and print the layer units "
        "with the bytes each reads and its estimated peak memory.",
        epilog="example:\n  mergeline plan recipe.yaml", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--output", metavar="URI", help="output URI (overrides the recipe's 'output')")
    p.add_argument("--replace", action="store_true", help="as merge --replace: plan to replace another recipe's model")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=_plan)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _plan(args) -> int:
    from .plan import make_plan
    from .recipe import load_recipe
    from .unit import UnitJob, share_budget, tensor_steps, unit_bytes

    plan = make_plan(load_recipe(args.recipe, output=args.output), replace=args.replace)
    jobs = share_budget([UnitJob.from_plan(plan, u, staging="") for u in plan.units])
    steps = [tensor_steps(job) for job in jobs]
    peaks = [unit_bytes(job, s) for job, s in zip(jobs, steps, strict=True)]
    streamed = [sum(bool(t.window) for t in s) for s in steps]
    if args.json:
        print(json.dumps({
            "output": plan.output, "method": plan.recipe.method, "device": plan.device, "notes": plan.notes,
            "units": [{"name": u.name, "shard": u.shard, "tensors": len(u.tensors), "bytes_in": u.bytes_in,
                       "peak_bytes": peak, "streamed_tensors": n}
                      for u, peak, n in zip(plan.units, peaks, streamed, strict=True)],
        }, indent=2))
        return 0
    console = Console()
    r = plan.recipe
    console.print(f"[bold]{r.name}[/]: {r.method} of {len(plan.experts)} experts"
                  f"{' onto ' + r.base if r.base else ''} -> {plan.output} (device {plan.device})")
    table = Table("unit", "tensors", "shard", "MB read", "peak MB", "streamed")
    for u, peak, n in zip(plan.units, peaks, streamed, strict=True):
        table.add_row(u.name, str(len(u.tensors)), u.shard, _mb(u.bytes_in), _mb(peak), str(n or ""))
    console.print(table)
    console.print(f"{len(plan.units)} units, {_mb(sum(u.bytes_in for u in plan.units))} MB to read, "
                  f"peak per task ~{_mb(max(peaks))} MB")
    if any(streamed):
        console.print(f"{sum(streamed)} tensors do not fit the memory budget whole: they are read and merged a "
                      "window of rows at a time (TIES reads their inputs three times, DARE with rescale: l1 twice)"
                      + _pass_source(jobs[0].sources))
    for note in plan.notes:
        console.print(f"note: {note}")
    return 0


def _pass_source(sources) -> str:
    """Where a streamed tensor's later passes read from, when the checkpoints it reads are on S3."""
    from storage import ReadCache
    from storage.uri import is_s3

    if not any(is_s3(c.uri) for c in sources):
        return ""
    cache = ReadCache.from_env()
    if cache:
        return f"; from S3 once, then from the read cache in {cache.directory}"
    return "; from S3 on every pass: set MERGELINE_CACHE_DIR to download each range once"


def runner_options(args) -> dict:
    """--runner, --address and --workers, checked together before any work."""
    if args.runner == "dask" and not args.address:
        raise ValueError("--runner dask needs --address tcp://HOST:PORT of a running Dask scheduler")
    if args.runner == "threads" and args.address:
        raise ValueError("--address is for --runner dask; add --runner dask, or drop --address")
    return {"runner": args.runner, "address": args.address, "workers": args.workers}


def _merge(args) -> int:
    from . import merge_flow
    from .cli import watched_run
    from .recipe import load_recipe

    runner = runner_options(args)
    recipe = load_recipe(args.recipe, output=args.output)
    console = Console(stderr=True)
    progress = Progress(TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=console, disable=args.json)
    bar = progress.add_task("", total=None)

    def on_unit(name: str, done: int, total: int, cached: bool) -> None:
        progress.update(bar, completed=done, total=total, description=f"{name}{' (cached)' if cached else ''}")

    merge_flow.progress_listeners.append(on_unit)
    try:
        with progress, watched_run():
            summary = merge_flow.run_merge(recipe, **runner, catalog_path=args.catalog, trigger=args.trigger,
                                           replace=args.replace)
    finally:
        merge_flow.progress_listeners.remove(on_unit)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"published {summary['output']} ({summary['units']} units, {len(summary['cached'])} from cache)")
        if summary.get("read_cache"):
            c = summary["read_cache"]
            print(f"read cache: {c['hits']} ranges ({_mb(c['bytes_from_cache'])} MB) from the cache, "
                  f"{c['misses']} ({_mb(c['bytes_downloaded'])} MB) downloaded, {c['evictions']} evicted")
        print(f"model id {summary['model_id']}, run {summary['run_id']}; "
              f"try: mergeline catalog lineage {summary['model_id']}")
    return 0
