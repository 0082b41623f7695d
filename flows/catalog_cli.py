"""`mergeline catalog ...`: query the lineage and metrics catalog.

Tables for people (rich), `--json` for programs. The catalog location comes from --catalog,
$MERGELINE_CATALOG, or the user's data directory, and `mergeline catalog --help` shows which.
"""

from __future__ import annotations

import argparse
import json
import os

import duckdb
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from storage.catalog import SPLITS, STATUSES, Catalog, CatalogBusy, default_catalog_path


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def add_parser(sub) -> None:
    source = "$MERGELINE_CATALOG" if os.environ.get("MERGELINE_CATALOG") else "default"
    p = sub.add_parser(
        "catalog", help="query the lineage and metrics catalog",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Query the lineage and metrics catalog (DuckDB): models, how they were merged, their scores.\n\n"
            f"catalog: {default_catalog_path()} ({source})\n"
            "change it with --catalog PATH or $MERGELINE_CATALOG; schema: docs/catalog.md"
        ),
    )
    _options(p, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _options(common, suppress=True)  # also accepted after the subcommand, without overriding
    cmds = p.add_subparsers(dest="catalog_command", metavar="COMMAND", required=True)

    def add(name, fn, help_text):
        s = cmds.add_parser(name, parents=[common], help=help_text, description=help_text)
        s.set_defaults(run=_guarded(fn))
        return s

    add("list", _list, "models with their latest scores")
    add("show", _show, "one model: versions, the run that made it, runs that used it, scores").add_argument(
        "model", help="id, name (latest version), name@vN or URI")
    add("lineage", _lineage, "the full ancestor tree of a model, with method, parameters and weights").add_argument(
        "model", help="id, name (latest version), name@vN or URI")
    add("derived-from", _derived, "every model that has MODEL as an ancestor").add_argument(
        "model", help="name or URI (every version of it), name@vN or id (that version)")
    s = add("best", _best, "rank models on a task by their latest score")
    s.add_argument("--task", required=True)
    s.add_argument("--metric", help="needed when the task has several metrics")
    s.add_argument("--split", metavar="{" + ",".join(SPLITS) + "}", help="the split (held_in is held-in)")
    s = add("runs", _runs, "merge runs, newest first")
    s.add_argument("--status", choices=STATUSES)
    s.add_argument("--recipe", help="only runs of this recipe name")
    s.add_argument("--limit", type=_at_least_one, metavar="N", help="the N newest runs")
    add("sql", _sql, "read-only SQL over the catalog (schema in docs/catalog.md)").add_argument(
        "query", help='e.g. "SELECT name, version FROM checkpoints"')
    add("export", _export, "write every table to Parquet in a local directory or s3://bucket/prefix").add_argument(
        "dest")


def _options(parser, *, suppress: bool) -> None:
    parser.add_argument("--catalog", metavar="PATH", default=argparse.SUPPRESS if suppress else None,
                        help="catalog file (default: $MERGELINE_CATALOG or the user data directory)")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="machine-readable output")


def _guarded(fn):
    def run(args) -> int:
        try:
            return fn(args, Catalog(args.catalog, create=False))
        except (CatalogBusy, duckdb.IOException) as exc:
            raise ValueError(str(exc)) from None

    return run


def _emit(args, data, render) -> int:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        console = Console(highlight=False)
        if not console.is_terminal:  # piped or captured: wide rather than truncated
            console = Console(highlight=False, width=max(console.width, 160))
        render(console)
    return 0


def _num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _count(n) -> str:
    if n is None:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _time(t) -> str:
    return (t or "")[:19].replace("T", " ")


def _table(title, columns, rows) -> Table:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, no_wrap=c in ("id", "run", "model"))
    for r in rows:
        table.add_row(*[str(x) for x in r])
    return table


def _score(s) -> str:
    norm = f" (norm {_num(s['normalized_value'])})" if s.get("normalized_value") is not None else ""
    return f"{s['task']} [{s['split']}] {s['metric']} {_num(s['value'])}{norm}"


def _list(args, cat) -> int:
    models = cat.list_models()
    rows = [(m["label"], m["kind"], m["id"], m["model_type"] or "", _count(m["param_count"]), m["dtype"] or "",
             _time(m["registered_at"]), "\n".join(_score(s) for s in m["scores"])) for m in models]
    return _emit(args, models, lambda con: con.print(
        _table(f"{len(models)} models", ["model", "kind", "id", "type", "params", "dtype", "registered", "latest scores"],
               rows) if models else "no models in the catalog yet"))


def _run_rows(runs):
    for r in runs:
        inputs = ", ".join(f"{i['label']}" + (f"×{_num(i['weight'])}" if i["weight"] is not None else "")
                           for i in r["inputs"])
        yield (r["id"], _time(r["started_at"]), r["recipe_name"], r["method"], r["trigger"], r["status"], inputs,
               r["output_label"] or "", _num(r["duration_s"]), (r["error"] or "")[:80])


_RUN_COLUMNS = ["run", "started", "recipe", "method", "trigger", "status", "inputs", "output", "secs", "error"]


def _show(args, cat) -> int:
    m = cat.show(args.model)

    def render(con):
        info = Table.grid(padding=(0, 2))
        for key in ("label", "id", "kind", "uri", "identity", "model_type", "param_count", "dtype", "tags",
                    "metadata", "registered_at"):
            info.add_row(key, json.dumps(m[key]) if isinstance(m[key], (dict, list)) else _num(m[key]))
        con.print(info)
        if len(m["versions"]) > 1:
            con.print(_table("versions", ["version", "id", "uri", "registered"],
                             [(v["version"], v["id"], v["uri"], _time(v["registered_at"])) for v in m["versions"]]))
        if m["produced_by"]:
            con.print(_table("made by", _RUN_COLUMNS, _run_rows([m["produced_by"]])))
        if m["used_by"]:
            con.print(_table("used by", _RUN_COLUMNS, _run_rows(m["used_by"])))
        con.print(_table("latest scores", ["suite", "task", "split", "metric", "value", "normalized", "examples"],
                         [(s["suite"], s["task"], s["split"], s["metric"], _num(s["value"]),
                           _num(s["normalized_value"]), _num(s["num_examples"])) for s in m["scores"]]))

    return _emit(args, m, render)


def _lineage(args, cat) -> int:
    root = cat.lineage(args.model)

    def label(node) -> str:
        return f"[bold]{node['label']}[/] {node['kind']} {node['id']} {node['uri']}"

    def grow(tree: Tree, node) -> None:
        run = node["run"]
        if run is None:
            return
        params = json.dumps(run["parameters"], sort_keys=True) if run["parameters"] else ""
        step = tree.add(f"{run['method']} {params} (run {run['id']}, recipe {run['recipe_name']})")
        if run["base"]:
            grow(step.add("base: " + label(run["base"])), run["base"])
        for i in run["inputs"]:
            extra = f" {json.dumps(i['parameters'], sort_keys=True)}" if i["parameters"] else ""
            weight = f" weight {_num(i['weight'])}" if i["weight"] is not None else ""
            grow(step.add(f"input {i['position']}{weight}{extra}: " + label(i["model"])), i["model"])

    def render(con):
        tree = Tree(label(root))
        grow(tree, root)
        con.print(tree)

    return _emit(args, root, render)


def _derived(args, cat) -> int:
    models = cat.derived_from(args.model)
    rows = [(m["generation"], m["label"], m["kind"], m["id"], m["method"] or "", m["run_id"] or "", m["uri"])
            for m in models]
    return _emit(args, models, lambda con: con.print(
        _table(f"{len(models)} models derived from {args.model}",
               ["gen", "model", "kind", "id", "method", "run", "uri"], rows)
        if models else f"no models are derived from {args.model}"))


def _best(args, cat) -> int:
    ranked = cat.best(args.task, metric=args.metric, split=args.split)
    rows = [(r["rank"], r["label"], r["kind"], r["split"], r["metric"], _num(r["value"]), _num(r["normalized_value"]),
             _num(r["num_examples"]), r["suite"], _time(r["recorded_at"])) for r in ranked]
    direction = "higher" if ranked[0]["higher_is_better"] else "lower"
    return _emit(args, ranked, lambda con: con.print(_table(
        f"best on {args.task} ({ranked[0]['metric']}, {direction} is better)",
        ["rank", "model", "kind", "split", "metric", "value", "normalized", "examples", "suite", "recorded"], rows)))


def _runs(args, cat) -> int:
    runs = cat.runs(status=args.status, limit=args.limit, recipe_name=args.recipe)
    return _emit(args, runs, lambda con: con.print(
        _table(f"{len(runs)} merge runs", _RUN_COLUMNS, _run_rows(runs)) if runs else "no merge runs"))


def _sql(args, cat) -> int:
    result = cat.sql(args.query)
    columns = list(result[0]) if result else []
    rows = [[json.dumps(v) if isinstance(v, (dict, list)) else _num(v) for v in r.values()] for r in result]
    return _emit(args, result, lambda con: con.print(
        _table(f"{len(result)} rows", columns, rows) if result else "(no rows)"))


def _export(args, cat) -> int:
    files = cat.export(args.dest)
    return _emit(args, files, lambda con: [con.print(f) for f in files])
