"""`mergeline eval`: score a model on a suite, normalised against its experts and base."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

EXAMPLE = """example:
  mergeline eval soup-v1 --suite s3://models/suites/zoo.yaml
  mergeline eval s3://models/merged/soup-v1 --suite suite.yaml --base s3://models/base \\
      --expert addition=s3://models/experts/addition --expert reverse=s3://models/experts/reverse

Held-in tasks are the tasks of the experts MODEL was merged from (the catalog knows them; or
give them with --expert), each normalised by its expert's score; held-out tasks are normalised
by the base model's score (the base of the run that made MODEL unless given with --base).
Every score is recorded in the catalog."""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a task suite and record the scores",
                       description="Run the Prefect evaluate flow for one model.", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model URI, or a catalog reference (id, name, name@vN)")
    p.add_argument("--suite", required=True, metavar="URI", help="suite YAML (local path or s3://)")
    p.add_argument("--base", metavar="URI", help="base model to normalise held-out tasks by")
    p.add_argument("--expert", action="append", default=[], metavar="NAME=URI",
                   help="an expert named in the suite, by URI (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the model")
    p.add_argument("--catalog", metavar="PATH", help="catalog DuckDB file (default: $MERGELINE_CATALOG or the user data dir)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(run=_eval)


def _eval(args) -> int:
    from .cli import watched_run
    from .evaluate_flow import evaluate_flow

    experts = {}
    for item in args.expert:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise ValueError(f"--expert takes NAME=URI, got {item!r}")
        experts[name] = uri
    with watched_run():
        summary = evaluate_flow(args.model, args.suite, catalog_path=args.catalog, base=args.base,
                                experts=experts or None, device=args.device)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    table = Table("task", "split", "metric", "score", "reference", "normalised",
                  title=f"{summary['model']} on {summary['suite']}")
    for s in summary["scores"]:
        norm = "n/a" if s["normalised"] is None else f"{s['normalised']:.3f}"
        table.add_row(s["task"], s["split"], s["metric"], f"{s['value']:.4f}", f"{s['reference']:.4f}", norm)
    console = Console()
    console.print(table)
    for split in ("held_in", "held_out"):
        if summary[split] is not None:
            console.print(f"{split.replace('_', '-')} normalised average: {summary[split]:.3f}")
    return 0
