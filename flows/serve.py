"""`mergeline serve` (the deployments, served in this process), `mergeline watch` and `mergeline nightly`.

`serve` is the one-machine install: the same deployments as infra/prefect.yaml (merge, watcher,
nightly, evaluate), with their schedules, run by this process through `prefect.serve` — no work
pool, no worker. Schedules need a Prefect server (Prefect's ephemeral API has no scheduler):
point PREFECT_API_URL at one, or pass --start-server to run `prefect server start` alongside.
`watch` and `nightly` run one scan / one nightly merge now, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta

from .merge_cli import runner_options

WATCH_EVERY_S = 60
NIGHTLY_CRON = "0 2 * * *"                # UTC
MERGE_DEPLOYMENT = "merge/merge"          # "<flow name>/<deployment name>", as in infra/prefect.yaml
EVALUATE_ENTRYPOINT = "flows.evaluate_flow:evaluate_flow"

SERVE_EXAMPLE = """examples:
  mergeline serve --recipes recipes/ --start-server
  PREFECT_API_URL=http://127.0.0.1:4200/api mergeline serve --recipes s3://models/recipes/ \\
      --experts s3://models/experts/ --watch-every 30
  mergeline serve --recipes recipes/ --dry-run      # show the deployments and exit

Deployments: merge (run by the watcher), watcher (every --watch-every seconds), nightly
(--nightly-cron, UTC), evaluate (when flows/evaluate_flow.py exists). serve also creates the
automation that marks a run Crashed when its heartbeats stop (flows/silent_runs.py)."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", action="append", required=True, metavar="PATH|URI",
                   help="recipe file, directory or S3 prefix of recipe YAML (repeatable)")
    p.add_argument("--catalog", metavar="PATH", help="catalog DuckDB file (default: $MERGELINE_CATALOG or the user data dir)")
    p.add_argument("--runner", choices=["threads", "dask"], default="threads",
                   help="where the layer tasks of merges run here: a thread pool (default) or a Dask cluster")
    p.add_argument("--address", metavar="tcp://HOST:PORT", help="Dask scheduler address (with --runner dask)")
    p.add_argument("--workers", type=int, default=4, metavar="N", help="threads per merge with --runner threads")


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return seconds


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="run the watcher, nightly and merge deployments in this process (one-machine install)",
        description="Serve mergeline's deployments from this process with prefect.serve: the watcher on an "
        "interval, the nightly merge on a cron schedule (UTC), the merge deployment the watcher triggers, "
        "and evaluate. Needs a Prefect server (PREFECT_API_URL) or --start-server.",
        epilog=SERVE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--experts", action="append", metavar="PREFIX",
                   help="experts prefix to watch (repeatable; the recipes' models_from prefixes are always watched)")
    p.add_argument("--watch-every", type=_positive_seconds, default=WATCH_EVERY_S, metavar="SECONDS",
                   help=f"seconds between watcher scans (default: {WATCH_EVERY_S})")
    p.add_argument("--nightly-cron", default=NIGHTLY_CRON, metavar="CRON",
                   help=f"nightly merge schedule, UTC (default: '{NIGHTLY_CRON}')")
    p.add_argument("--merge-in-process", action="store_true",
                   help="the watcher merges inside its own run instead of starting runs of the merge deployment "
                   "(implied by --runner dask)")
    p.add_argument("--limit", type=int, default=2, metavar="N", help="flow runs at once (default: 2)")
    p.add_argument("--start-server", action="store_true",
                   help="start `prefect server start` on 127.0.0.1 for as long as this runs")
    p.add_argument("--port", type=int, default=4200, help="port for --start-server (default: 4200)")
    p.add_argument("--dry-run", action="store_true", help="print the deployments as JSON and exit")
    p.set_defaults(run=_serve)

    p = sub.add_parser("watch", help="scan the experts prefixes once now; merge recipes that select new experts",
                       description="One run of the watcher flow in this process (merges run here too).")
    _common(p)
    p.add_argument("--experts", action="append", metavar="PREFIX", help="experts prefix to watch (repeatable)")
    p.add_argument("--json", action="store_true", help="print the scan summary as JSON")
    p.set_defaults(run=_watch)

    p = sub.add_parser("nightly", help="run the nightly merge now: merge each recipe whose inputs changed",
                       description="One run of the nightly flow in this process; unchanged recipes are recorded "
                       "as skipped runs.")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_nightly)


def build_deployments(
    recipes: list[str],
    *,
    experts: list[str] | None = None,
    catalog_path: str | None = None,
    watch_every: float = WATCH_EVERY_S,
    nightly_cron: str = NIGHTLY_CRON,
    merge_in_process: bool = False,
    runner: dict | None = None,
) -> list:
    """The RunnerDeployments `serve` runs (names and schedules as in infra/prefect.yaml)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    from .merge_flow import merge_flow
    from .nightly import nightly_merge
    from .watcher import watch_experts

    runner = runner or {}
    if runner.get("runner") == "dask":   # the merge deployment runs its layers in threads; Dask means in-process
        merge_in_process = True
    module = EntrypointType.MODULE_PATH  # importable wherever mergeline is installed, whatever the cwd
    # A scan overlapping the last one is dropped (the next comes a minute later); a nightly merge
    # started while one runs waits its turn (infra/prefect.yaml says the same).
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    queued = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    deployments = [
        merge_flow.to_deployment(
            "merge", entrypoint_type=module, tags=["mergeline"],
            description="Merge one recipe (YAML text); started by the watcher with run_deployment.",
        ),
        watch_experts.to_deployment(
            "watcher", entrypoint_type=module, tags=["mergeline"], concurrency_limit=one_at_a_time,
            schedules=[Interval(timedelta(seconds=watch_every))],
            parameters={"recipes": recipes, "experts": experts or [], "catalog_path": catalog_path,
                        "merge_deployment": None if merge_in_process else MERGE_DEPLOYMENT, **runner},
            description="Register newly landed experts, emit mergeline.expert.landed, merge the recipes selecting them.",
        ),
        nightly_merge.to_deployment(
            "nightly", entrypoint_type=module, tags=["mergeline"], concurrency_limit=queued,
            schedules=[Cron(nightly_cron, timezone="UTC")],
            parameters={"recipes": recipes, "catalog_path": catalog_path, **runner},
            description="Merge every recipe over the current experts; unchanged inputs are recorded as skipped.",
        ),
    ]
    evaluate = load_evaluate_flow()
    if evaluate is not None:
        deployments.append(evaluate.to_deployment(
            "evaluate", entrypoint_type=module, tags=["mergeline"], description="Evaluate a model on its suites."))
    return deployments


def load_evaluate_flow():
    """flows.evaluate_flow.evaluate_flow, or None while that module does not exist."""
    import importlib

    module, _, name = EVALUATE_ENTRYPOINT.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return None


def describe(deployments: list) -> list[dict]:
    out = []
    for d in deployments:
        out.append({
            "name": f"{d.flow_name}/{d.name}", "entrypoint": d.entrypoint,
            "schedules": [json.loads(s.schedule.model_dump_json()) for s in d.schedules or []],
            "parameters": d.parameters,
        })
    return out


def _absolute(location: str) -> str:
    """Local paths made absolute: served runs start in their own processes."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def _check_something_to_watch(args) -> None:
    """What every watcher scan would fail on, said once at start-up instead; recipes that do not
    load are reported (the scans load the recipes again each time, so they may be fixed later)."""
    from .selection import load_recipes, watched_prefixes

    recipes = [_absolute(r) for r in args.recipes]
    loaded, errors = load_recipes(recipes)
    for e in errors:
        print(f"mergeline serve: recipe not loaded: {e}", file=sys.stderr)
    if not watched_prefixes([_absolute(e) for e in args.experts or []], loaded):
        raise ValueError("nothing to watch: no loaded recipe selects experts with models_from; give --experts "
                         "PREFIX, or fix the recipes above")


def _serve(args) -> int:
    _check_something_to_watch(args)
    deployments = build_deployments(
        [_absolute(r) for r in args.recipes], experts=[_absolute(e) for e in args.experts or []],
        catalog_path=_absolute(args.catalog) if args.catalog else None, watch_every=args.watch_every,
        nightly_cron=args.nightly_cron, merge_in_process=args.merge_in_process, runner=runner_options(args),
    )
    if args.dry_run:
        print(json.dumps(describe(deployments), indent=2, default=str))
        return 0
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from .silent_runs import ensure_silent_run_automation

    if args.start_server:
        server, url = _start_server(args.port)
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                ensure_silent_run_automation()
                serve(*deployments, limit=args.limit)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        return 0
    if not PREFECT_API_URL.value():
        raise ValueError(
            "mergeline serve needs a Prefect server for its schedules (the ephemeral API has no scheduler); "
            "start one with `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api, "
            "or pass --start-server"
        )
    ensure_silent_run_automation()
    serve(*deployments, limit=args.limit)
    return 0


def _start_server(port: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise ValueError(f"port {port} is in use; is a Prefect server already running? set PREFECT_API_URL "
                             f"to it, or pick another --port")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_api(server, url, timeout=180)
    except RuntimeError:
        server.terminate()
        raise
    print(f"Prefect server up at {url} (UI at http://127.0.0.1:{port})", file=sys.stderr)
    return server, url


def wait_for_api(server: subprocess.Popen, url: str, timeout: float) -> None:
    """Wait until the Prefect API at `url` (started as `server`) answers /health; RuntimeError if
    the server exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server did not answer {url}/health within {timeout:.0f} s")


class FlowFailed(ValueError):
    """A watcher or nightly run that failed; its message lists every problem (printed without a
    traceback), and `summary` is what the run did before it failed, where it got that far."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


def _result(state):
    if state.is_failed() or state.is_crashed():
        try:
            state.result()
        except Exception as exc:  # noqa: BLE001 - re-raised as one line for the CLI
            raise FlowFailed(str(exc), getattr(exc, "summary", None)) from exc
        raise FlowFailed(state.message or "the flow run failed")
    return state.result()


def _report(state, args, print_lines) -> int:
    """Print a watcher or nightly run's summary (as JSON with --json), also when the run failed
    part way: what merged is worth knowing; then the failure goes up for the CLI to report."""
    try:
        summary, failed = _result(state), None
    except FlowFailed as exc:
        if exc.summary is None:
            raise
        summary, failed = exc.summary, exc
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_lines(summary)
    if failed:
        raise failed
    return 0


def _watch(args) -> int:
    from .cli import watched_run
    from .watcher import watch_experts

    with watched_run():
        state = watch_experts(recipes=args.recipes, experts=args.experts, catalog_path=args.catalog,
                              **runner_options(args), return_state=True)
    return _report(state, args, _print_scan)


def _print_scan(summary: dict) -> None:
    for prefix, scan in summary["scanned"].items():
        print(f"{prefix}: {len(scan['complete'])} complete, {len(scan['pending'])} pending")
        for name, why in scan["pending"].items():
            print(f"  pending {name}: {why}")
    for x in summary["landed"]:
        print(f"landed {x['label']} {x['uri']} ({x['identity'][:12]})")
    for m in summary["merges"]:
        print(f"{m['recipe']}: {m['action']} {m.get('output') or ''}")


def _nightly(args) -> int:
    from .cli import watched_run
    from .nightly import nightly_merge

    with watched_run():
        state = nightly_merge(recipes=args.recipes, catalog_path=args.catalog, **runner_options(args),
                              return_state=True)
    return _report(state, args, _print_recipes)


def _print_recipes(summary: dict) -> None:
    for r in summary["recipes"]:
        print(f"{r['recipe']}: {r['action']} {r.get('output') or ''}")
