"""`make demo`: the whole pipeline on an offline expert zoo, through S3, Prefect and the catalog.

1. An S3-compatible endpoint: the one configured (AWS_ENDPOINT_URL, or real AWS with
   MERGELINE_DEMO_BUCKET), else moto's server started here on 127.0.0.1.
2. The zoo (a tiny Llama base + 8 experts, built once and cached) uploaded to the bucket.
3. The merge flow for each method on 2, 4 and 8 experts, S3 to S3, each evaluated on the suite.
4. A table shaped like "What Matters for Model Merging at Scale?" (method x number of experts,
   held-in / held-out normalised scores), report.md and report.png.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

import storage
from evaluation.zoo_tasks import DEFAULT_HELD_IN
from storage import s3

from .cli import prefect_defaults, watched_run

METHOD_PARAMETERS = {  # the demo's settings; see docs/methods.md for what each means
    "linear": {},
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.3, "lambda": 1.0},
    "dare_ties": {"density": 0.3, "lambda": 1.0},
    "dare_linear": {"density": 0.3, "lambda": 0.5},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=".mergeline/demo", help="zoo cache, catalog and report (default: %(default)s)")
    p.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties", help="comma-separated merge methods")
    p.add_argument("--sizes", default="2,4,8", help="numbers of experts to merge (default: %(default)s)")
    p.add_argument("--bucket", default=os.environ.get("MERGELINE_DEMO_BUCKET", "mergeline-demo"))
    p.add_argument("--zoo-tasks", help=argparse.SUPPRESS)  # reduced zoo for the test suite: "copy,upper"
    p.add_argument("--zoo-steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    prefect_defaults()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHOD_PARAMETERS]
    if unknown or not methods:
        p.error(f"--methods: unknown method(s) {unknown}; choose from {sorted(METHOD_PARAMETERS)}")
    sizes, most = [n for n in args.sizes.split(",") if n], len(DEFAULT_HELD_IN)  # the zoo's experts
    if not sizes or not all(n.isdigit() and 2 <= int(n) <= most for n in sizes):
        p.error(f"--sizes: comma-separated numbers of experts from 2 to {most}, got {args.sizes!r}")
    sizes = [int(n) for n in sizes]
    work = Path(args.workdir).resolve()
    console = Console()
    t0 = time.perf_counter()

    server = _endpoint(console)
    try:
        summary = run_demo(work, args.bucket, methods, sizes, console, args.zoo_tasks, args.zoo_steps)
    finally:
        if server is not None:
            server.stop()
    console.print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; report: {summary['report']}")
    return 0


def _endpoint(console: Console):
    """Use the configured S3 endpoint, or start moto's server on a free local port."""
    if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MERGELINE_DEMO_BUCKET"):
        console.print(f"S3: using {os.environ.get('AWS_ENDPOINT_URL', 'AWS')} as configured")
        return None
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's per-request log

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="demo",
                      AWS_SECRET_ACCESS_KEY="demo", AWS_DEFAULT_REGION="us-east-1")
    console.print(f"S3: started an embedded S3-compatible endpoint (moto) at http://127.0.0.1:{port}")
    return server


def run_demo(work: Path, bucket: str, methods: list[str], sizes: list[int], console: Console,
             zoo_tasks: str | None = None, zoo_steps: int | None = None) -> dict:
    from evaluation.zoo import build_zoo
    from flows.merge_flow import run_merge
    from flows.recipe import parse_recipe

    overrides = {}
    if zoo_tasks:
        overrides["tasks"] = tuple(zoo_tasks.split(","))
    if zoo_steps:
        overrides.update(base_steps=zoo_steps, expert_steps=zoo_steps, min_margin=0.0)  # a quick, unchecked zoo
    zoo_dir = work / "zoo"
    workers = 1 if zoo_steps else None  # a quick zoo is not worth starting training processes for
    manifest = build_zoo(zoo_dir, log=console.print, workers=workers, **overrides)
    prefix = f"s3://{bucket}/zoo"
    _upload_zoo(zoo_dir, bucket, console)
    experts = list(manifest["experts"])
    sizes = [n for n in sizes if n <= len(experts)]  # a reduced zoo (the tests') has fewer experts
    if not sizes:
        raise ValueError(f"the zoo has {len(experts)} experts, fewer than every size asked for")
    catalog = str(work / "catalog.duckdb")
    console.print(f"catalog: {catalog}")

    results: dict[tuple[str, int], dict] = {}
    for method in methods:
        for n in sizes:
            name = f"{method}-{n}"
            chosen = experts[:n]
            recipe = {
                "name": name, "merge_method": method,
                "base_model": f"{prefix}/base",  # linear ignores it; it is recorded and used by the evaluation
                "models": [{"model": f"{prefix}/experts/{e}"} for e in chosen],
                "parameters": METHOD_PARAMETERS[method], "dtype": "float32",
                "output": f"s3://{bucket}/merged/{name}",
                "evaluate": {"suite": f"{prefix}/suite.yaml",
                             "experts": {e: f"{prefix}/experts/{e}" for e in chosen}},
            }
            text = yaml.safe_dump(recipe, sort_keys=False)
            t0 = time.perf_counter()
            with watched_run():
                summary = run_merge(parse_recipe(text, source=f"{name}.yaml"), catalog_path=catalog)
            ev = summary["evaluation"]
            results[(method, n)] = ev
            console.print(f"{name:>20}: held-in {_fmt(ev['held_in'])}, held-out {_fmt(ev['held_out'])} "
                          f"({len(summary['cached'])}/{summary['units']} layers from cache, "
                          f"{time.perf_counter() - t0:.1f} s)")

    table = _table(results, methods, sizes)
    console.print(table)
    report = work / "report.md"
    report.write_text(_markdown(results, methods, sizes, catalog))
    _plot(results, methods, sizes, work / "report.png")
    console.print("\nnext, try:")
    last = f"{methods[-1]}-{sizes[-1]}"
    for cmd in ("list", f"lineage {last}", f"derived-from {experts[0]}", f"best --task {experts[0]} --split held-in",
                "runs", "sql \"SELECT name, version, kind FROM checkpoints ORDER BY name\""):
        print(f"  .venv/bin/mergeline catalog --catalog {catalog} {cmd}")
    return {"results": results, "report": str(report), "catalog": catalog}


def _upload_zoo(zoo: Path, bucket: str, console: Console) -> None:
    client = s3.shared_client()
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    files = [f for f in zoo.rglob("*") if f.is_file() and f.name != "train.jsonl"]  # training data stays local
    for f in files:
        s3.upload_file(str(f), bucket, f"zoo/{f.relative_to(zoo).as_posix()}")
    for sub in ["base", *[f"experts/{d.name}" for d in (zoo / "experts").iterdir()]]:
        if not storage.is_complete(f"s3://{bucket}/zoo/{sub}"):  # the landing convention: marker last
            s3.put_bytes(bucket, f"zoo/{sub}/{storage.COMPLETE_MARKER}", b"{}")
    console.print(f"uploaded the zoo ({len(files)} files) to s3://{bucket}/zoo/")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _table(results, methods, sizes) -> Table:
    table = Table(title="normalised scores: held-in (vs each task's expert) / held-out (vs the base)")
    table.add_column("method")
    for n in sizes:
        table.add_column(f"{n} experts", justify="center")
    for m in methods:
        table.add_row(m, *[f"{_fmt(results[m, n]['held_in'])} / {_fmt(results[m, n]['held_out'])}" for n in sizes])
    return table


def _markdown(results, methods, sizes, catalog: str) -> str:
    head = "| method | " + " | ".join(f"{n} experts (held-in / held-out)" for n in sizes) + " |"
    rule = "|---|" + "---|" * len(sizes)
    rows = [f"| {m} | " + " | ".join(f"{_fmt(results[m, n]['held_in'])} / {_fmt(results[m, n]['held_out'])}"
                                     for n in sizes) + " |" for m in methods]
    return "\n".join([
        "# mergeline demo report", "",
        "Normalised scores as in Yadav et al. 2024, *What Matters for Model Merging at Scale?*: held-in = "
        "merged score / the score of the expert trained on that task; held-out = merged score / the base "
        "model's score (perplexity inverted, so higher is better everywhere). Averages over tasks.", "",
        head, rule, *rows, "", f"Every score is in the catalog: `{catalog}`.", "", "![plot](report.png)", "",
    ])


def _plot(results, methods, sizes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, ("held_in", "held_out")):
        for m in methods:
            ys = [results[m, n][split] for n in sizes]
            ax.plot(sizes, [float("nan") if y is None else y for y in ys], marker="o", label=m)
        ax.set_title(split.replace("_", "-") + " (normalised)")
        ax.set_xlabel("number of experts merged")
        ax.set_xticks(sizes)
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0].set_ylabel("normalised score")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
