"""The lineage and metrics catalog: every checkpoint, how each merged model was made, how each scores.

A DuckDB file, opened per operation (see db.py), so merge flows, evaluators and watchers in
separate processes can all record into it. Queries return plain, JSON-serialisable Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from storage.catalog import db, schema
from storage.version import code_version as current_code_version

KINDS = ("base", "expert", "merged")
STATUSES = ("running", "succeeded", "failed", "skipped")
TRIGGERS = ("manual", "nightly", "new-expert")
SPLITS = ("held-in", "held-out")

# A checkpoint row plus its human label, 'name@vN'.
_CK = "c.*, c.name || '@v' || c.version AS label"


class CatalogError(ValueError):
    """Something the user can fix (unknown model, bad argument); `hint` says how."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def default_catalog_path() -> Path:
    """$MERGELINE_CATALOG, else <$XDG_DATA_HOME or ~/.local/share>/mergeline/catalog.duckdb."""
    env = os.environ.get("MERGELINE_CATALOG")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(data).expanduser() / "mergeline" / "catalog.duckdb"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # stored as naive UTC


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _norm_uri(uri: str) -> str:
    uri = str(uri)
    return uri.rstrip("/") or uri


def _split(split: str) -> str:
    """'held_in' (evaluation's spelling) and 'held-in' are the same split; stored as 'held-in'."""
    canonical = str(split).lower().replace("_", "-")
    if canonical not in SPLITS:
        raise CatalogError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return canonical


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise CatalogError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    return value


def _finite(value, what: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise CatalogError(f"{what} must be a finite number, got {value!r}")
    return number


class Catalog:
    """Handle on a catalog file; holds no connection, so it is cheap and safe to share across processes."""

    def __init__(self, path: str | Path | None = None, *, timeout: float = 30.0, create: bool = True):
        self.path = (Path(path).expanduser() if path else default_catalog_path()).absolute()
        self.timeout = timeout
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(
                    f"no catalog at {self.path} (a merge creates it; or pass --catalog / set $MERGELINE_CATALOG)"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif self._schema_version() == schema.LATEST:
            return
        with db.session(self.path, read_only=False, timeout=self.timeout) as con:
            schema.migrate(con, self.path)

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    # -- sessions -------------------------------------------------------------------------------

    def _schema_version(self) -> int:
        with self._read() as con:
            return schema.current_version(con)

    def _read(self):
        return db.session(self.path, read_only=True, timeout=self.timeout)

    @contextlib.contextmanager
    def _write(self):
        """One short transaction under the exclusive lock; the file is released again afterwards."""
        with db.session(self.path, read_only=False, timeout=self.timeout) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise

    def _find(self, con, ref: str) -> list[dict]:
        """What `ref` names, latest first: an id or name@vN one version, a URI or name each of its versions."""
        ref = str(ref)
        queries = [("c.id = ?", [ref]), ("c.uri = ?", [_norm_uri(ref)])]
        if m := re.fullmatch(r"(.+)@v(\d+)", ref):
            queries.append(("c.name = ? AND c.version = ?", [m[1], int(m[2])]))
        queries.append(("c.name = ?", [ref]))
        for where, params in queries:
            found = db.rows(
                con, f"SELECT {_CK} FROM checkpoints c WHERE {where} "
                "ORDER BY c.seen_at DESC, c.version DESC", params,
            )
            if found:
                return found
        return []

    def _require_all(self, con, ref: str) -> list[dict]:
        found = self._find(con, ref)
        if not found:
            raise CatalogError(
                f"no checkpoint {ref!r} in catalog {self.path}",
                hint="refer to a model by id, name, name@vN or URI; `mergeline catalog list` shows them",
            )
        return found

    def _require(self, con, ref: str) -> dict:
        """The one checkpoint `ref` names: a name or URI means its latest version."""
        return self._require_all(con, ref)[0]

    # -- writes ---------------------------------------------------------------------------------

    def register_checkpoint(
        self, uri: str, *, kind: str, name: str, identity: str, model_type: str | None = None,
        param_count: int | None = None, dtype: str | None = None, tags=(), metadata: dict | None = None,
    ) -> str:
        """Record a checkpoint; returns its id. Same (uri, identity) -> same id; new identity -> next version of `name`."""
        with self._write() as con:
            return self._register(con, uri, kind, name, identity, model_type, param_count, dtype, tags, metadata)

    def _register(self, con, uri, kind, name, identity, model_type, param_count, dtype, tags, metadata) -> str:
        _choice(kind, KINDS, "checkpoint kind")
        uri = _norm_uri(uri)
        if not (uri and name and identity):
            raise CatalogError("a checkpoint needs a URI, a name and an identity")
        existing = con.execute(
            "SELECT id FROM checkpoints WHERE uri = ? AND identity = ?", [uri, identity]
        ).fetchone()
        if existing:  # found there again: the latest at its URI and name once more
            con.execute("UPDATE checkpoints SET seen_at = ? WHERE id = ?", [_now(), existing[0]])
            return existing[0]
        if kind != "merged":  # an input's name is its folder's: the same name elsewhere is another model
            name = self._name_for_uri(con, uri, name)
        version = con.execute(
            "SELECT coalesce(max(version), 0) + 1 FROM checkpoints WHERE name = ?", [name]
        ).fetchone()[0]
        checkpoint_id = "ck-" + hashlib.sha256(f"{uri}\0{identity}".encode()).hexdigest()[:12]
        now = _now()
        tags = [tags] if isinstance(tags, str) else [str(t) for t in tags]
        con.execute(
            "INSERT INTO checkpoints (id, uri, kind, name, version, identity, model_type, param_count, dtype, "
            "tags, metadata, registered_at, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [checkpoint_id, uri, kind, name, version, identity, model_type,
             None if param_count is None else int(param_count), dtype, tags, _json(metadata), now, now],
        )
        return checkpoint_id

    @staticmethod
    def _name_for_uri(con, uri: str, name: str) -> str:
        """`name` unless another URI has it: then the shortest path suffix no other URI has
        (`zoo2/expert-0`), else the URI itself. A URI keeps its name from version to version."""
        parts = uri.rstrip("/").split("/")
        for candidate in [name, *("/".join(parts[-k:]) for k in range(2, len(parts) - 1))]:
            others = con.execute("SELECT 1 FROM checkpoints WHERE name = ? AND uri <> ? LIMIT 1",
                                 [candidate, uri]).fetchone()
            if not others:
                return candidate
        return uri

    def start_run(
        self, *, recipe_name: str, method: str, parameters: dict, recipe_text: str, base_id: str | None,
        inputs: list[dict], code_version: str | None = None, flow_run_id: str | None = None,
        trigger: str = "manual", target_uri: str | None = None,
    ) -> str:
        """Open a merge run (status 'running'); inputs are [{'checkpoint_id', 'weight', 'parameters'}] in order.

        code_version defaults to this checkout's (storage.version.code_version()).
        """
        _choice(trigger, TRIGGERS, "trigger")
        run_id = "run-" + uuid.uuid4().hex[:12]
        with self._write() as con:
            base = self._require(con, base_id)["id"] if base_id else None
            rows = [
                [run_id, position, self._require(con, i["checkpoint_id"])["id"],
                 None if i.get("weight") is None else float(i["weight"]), _json(i.get("parameters") or {})]
                for position, i in enumerate(inputs)
            ]
            con.execute(
                "INSERT INTO runs (id, recipe_name, method, parameters, recipe_text, recipe_digest, base_id, "
                "code_version, flow_run_id, trigger, status, started_at, target_uri) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                [run_id, recipe_name, method, _json(parameters or {}), recipe_text,
                 hashlib.sha256(recipe_text.encode()).hexdigest(), base, code_version or current_code_version(),
                 flow_run_id, trigger,
                 _now(), None if target_uri is None else _norm_uri(target_uri)],
            )
            if rows:
                con.executemany("INSERT INTO run_inputs VALUES (?, ?, ?, ?, ?)", rows)
        return run_id

    def begin_writing(self, run_id: str) -> list[str]:
        """Record that run_id now holds its output's lock; fail the runs that held it before and
        are still 'running' (their process died holding it: the lock is only free once they have
        stopped). Returns their ids. Runs still waiting for the lock never held it and are left alone."""
        with self._write() as con:
            row = con.execute("SELECT target_uri FROM runs WHERE id = ? AND status = 'running'", [run_id]).fetchone()
            if row is None:
                raise CatalogError(f"no running merge run {run_id!r} in catalog {self.path}")
            now = _now()
            abandoned = con.execute(
                "UPDATE runs SET status = 'failed', ended_at = ?, error = ? WHERE target_uri = ? AND status = 'running' "
                "AND writing_since IS NOT NULL AND id <> ? RETURNING id",
                [now, f"abandoned: its process stopped while writing {row[0]}; run {run_id} took the output over",
                 row[0], run_id]).fetchall()
            con.execute("UPDATE runs SET writing_since = ? WHERE id = ?", [now, run_id])
        return sorted(r[0] for r in abandoned)

    def finish_run(
        self, run_id: str, *, status: str, output_checkpoint_id: str | None = None, error: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        """Close a run. 'succeeded' needs a merged output checkpoint; 'failed' must have none."""
        with self._write() as con:
            self._finish(con, run_id, status, output_checkpoint_id, error, timings)

    def complete_run(
        self, run_id: str, uri: str, *, name: str, identity: str, model_type: str | None = None,
        param_count: int | None = None, dtype: str | None = None, tags=(), metadata: dict | None = None,
        timings: dict[str, float] | None = None,
    ) -> str:
        """Register the published merged model and mark its run succeeded in one transaction; returns its id.

        Call it only once the output is published complete. Unlike register_checkpoint + finish_run, a
        crash in between cannot leave a merged model without the run that made it.
        """
        with self._write() as con:
            checkpoint_id = self._register(
                con, uri, "merged", name, identity, model_type, param_count, dtype, tags, metadata
            )
            self._finish(con, run_id, "succeeded", checkpoint_id, None, timings)
        return checkpoint_id

    def _finish(self, con, run_id, status, output_id, error, timings) -> None:
        _choice(status, STATUSES[1:], "final run status")
        if status == "succeeded" and not output_id:
            raise CatalogError(f"run {run_id}: a succeeded run needs its output checkpoint")
        if status != "failed" and not con.execute("SELECT 1 FROM run_inputs WHERE run_id = ?", [run_id]).fetchone():
            raise CatalogError(f"run {run_id}: a run with no inputs can only fail")
        if status == "failed" and output_id:
            raise CatalogError(f"run {run_id}: a failed run has no output checkpoint")
        run = con.execute("SELECT status, base_id FROM runs WHERE id = ?", [run_id]).fetchone()
        if run is None:
            raise CatalogError(f"no merge run {run_id!r} in catalog {self.path}")
        if run[0] != "running":
            raise CatalogError(f"run {run_id} has already finished ({run[0]})")
        if output_id:
            output = self._require(con, output_id)
            output_id = output["id"]
            if status == "succeeded" and output["kind"] != "merged":
                raise CatalogError(f"run {run_id}: output {output['label']} is a {output['kind']}, not a merged model")
            inputs = {r[0] for r in con.execute("SELECT checkpoint_id FROM run_inputs WHERE run_id = ?", [run_id]).fetchall()}
            if output_id in inputs | {run[1]}:
                raise CatalogError(f"run {run_id}: output {output['label']} is also one of its inputs")
        con.execute(
            "UPDATE runs SET status = ?, output_id = ?, error = ?, timings = ?, ended_at = ? WHERE id = ?",
            [status, output_id, error, _json(timings), _now(), run_id],
        )

    def record_evaluation(
        self, *, checkpoint_id: str, suite: str, task: str, split: str, metric: str, value: float,
        normalized_value: float | None = None, normalized_against: str | None = None,
        num_examples: int | None = None, data_digest: str | None = None, flow_run_id: str | None = None,
        higher_is_better: bool | None = None,
    ) -> str:
        """Record one score; returns its id. higher_is_better defaults from the metric name (perplexity: lower)."""
        return self.record_evaluations([{k: v for k, v in locals().items() if k != "self"}])[0]

    def record_evaluations(self, scores: list[dict]) -> list[str]:
        """Record many scores (record_evaluation's keyword arguments each) in one transaction: all or none."""
        rows, ids = [], []
        for s in scores:
            s = dict(s)
            metric = s["metric"]
            hib = s.get("higher_is_better")
            if hib is None:
                hib = not any(w in metric.lower() for w in schema.LOWER_IS_BETTER)
            normalized = s.get("normalized_value")
            ids.append("ev-" + uuid.uuid4().hex[:12])
            rows.append([
                ids[-1], s["checkpoint_id"], s["suite"], s["task"], _split(s["split"]), metric,
                _finite(s["value"], "value"), None if normalized is None else _finite(normalized, "normalized_value"),
                s.get("normalized_against"), s.get("num_examples"), s.get("data_digest"), s.get("flow_run_id"),
                bool(hib),
            ])
        with self._write() as con:
            now = _now()
            for i, row in enumerate(rows):  # a microsecond apart, so a later duplicate is the latest score
                row[1] = self._require(con, row[1])["id"]
                row.append(now + timedelta(microseconds=i))
            con.executemany(
                "INSERT INTO evaluations (id, checkpoint_id, suite, task, split, metric, value, normalized_value, "
                "normalized_against, num_examples, data_digest, flow_run_id, higher_is_better, recorded_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows,
            )
        return ids

    # -- queries --------------------------------------------------------------------------------

    def find_checkpoint(self, ref: str) -> dict | None:
        """By id, URI (latest), 'name@vN', or name (latest version)."""
        with self._read() as con:
            found = self._find(con, ref)
        return found[0] if found else None

    def list_models(self) -> list[dict]:
        """Every checkpoint, newest first, each with its latest score per (suite, task, split, metric)."""
        with self._read() as con:
            models = db.rows(con, f"SELECT {_CK} FROM checkpoints c ORDER BY c.registered_at DESC, c.id")
            scores = db.rows(con, "SELECT * EXCLUDE (id) FROM latest_scores ORDER BY suite, task, split, metric")
        by_model: dict[str, list] = {}
        for s in scores:
            by_model.setdefault(s.pop("checkpoint_id"), []).append(s)
        return [{**m, "scores": by_model.get(m["id"], [])} for m in models]

    def show(self, ref: str) -> dict:
        """One checkpoint with its other versions, the run that made it, runs that used it, and its scores."""
        with self._read() as con:
            ck = self._require(con, ref)
            cid = ck["id"]
            ck["versions"] = db.rows(
                con, "SELECT id, version, uri, identity, registered_at FROM checkpoints WHERE name = ? "
                "ORDER BY version", [ck["name"]],
            )
            made = self._runs(con, "WHERE r.id IN (SELECT run_id FROM producers WHERE output_id = ?)", [cid])
            ck["produced_by"] = made[0] if made else None
            ck["used_by"] = self._runs(
                con, "WHERE r.base_id = ? OR r.id IN (SELECT run_id FROM run_inputs WHERE checkpoint_id = ?)",
                [cid, cid],
            )
            ck["scores"] = db.rows(
                con, "SELECT * EXCLUDE (checkpoint_id) FROM latest_scores WHERE checkpoint_id = ? "
                "ORDER BY suite, task, split, metric", [cid],
            )
            ck["evaluations"] = db.rows(
                con, "SELECT * EXCLUDE (checkpoint_id) FROM evaluations WHERE checkpoint_id = ? "
                "ORDER BY recorded_at DESC", [cid],
            )
        return ck

    def base_of(self, checkpoint_id: str) -> str | None:
        """The base URI of the latest succeeded run that produced this checkpoint with one: an
        identical output made again from a recipe that names its base (linear ignores it) keeps
        its first producer, which may have named none."""
        with self._read() as con:
            row = con.execute(
                "SELECT b.uri FROM runs r JOIN checkpoints b ON b.id = r.base_id WHERE r.output_id = ? "
                "AND r.status = 'succeeded' ORDER BY r.ended_at DESC LIMIT 1", [checkpoint_id]).fetchone()
        return row[0] if row else None

    def lineage(self, ref: str) -> dict:
        """The ancestor tree: each merged node carries its run (method, parameters, base, weighted inputs)."""
        with self._read() as con:
            root = self._require(con, ref)
            ids = [r[0] for r in con.execute(
                "WITH RECURSIVE anc(id) AS (SELECT ?::VARCHAR UNION "
                "SELECT e.parent_id FROM anc JOIN model_edges e ON e.child_id = anc.id) SELECT id FROM anc",
                [root["id"]],
            ).fetchall()]
            nodes = {c["id"]: c for c in db.rows(
                con, f"SELECT {_CK} FROM checkpoints c WHERE list_contains(?::VARCHAR[], c.id)", [ids])}
            made = {r["output_id"]: r for r in self._runs(
                con, "WHERE r.id IN (SELECT run_id FROM producers WHERE list_contains(?::VARCHAR[], output_id))", [ids])}

        def build(cid: str, path: frozenset) -> dict:
            node = dict(nodes[cid])
            run = made.get(cid)
            node["run"] = None
            if run is None or cid in path:  # a cycle cannot come from honest data, but never recurse forever
                return node
            path = path | {cid}
            node["run"] = {k: run[k] for k in (
                "id", "recipe_name", "method", "parameters", "recipe_digest", "code_version", "flow_run_id",
                "trigger", "started_at", "ended_at")}
            node["run"]["base"] = build(run["base_id"], path) if run["base_id"] else None
            node["run"]["inputs"] = [
                {"position": i["position"], "weight": i["weight"], "parameters": i["parameters"],
                 "model": build(i["checkpoint_id"], path)}
                for i in run["inputs"]
            ]
            return node

        return build(root["id"], frozenset())

    def derived_from(self, ref: str) -> list[dict]:
        """Every checkpoint with `ref` among its ancestors (as base or input), nearest generation first.
        A name or URI means every version of it (a model made from an expert's first version is
        still derived from that expert); an id or name@vN that version only."""
        with self._read() as con:
            roots = [c["id"] for c in self._require_all(con, ref)]
            return db.rows(con, f"""
                WITH RECURSIVE d(id, generation) AS (
                    SELECT unnest(?::VARCHAR[]), 0
                    UNION
                    SELECT e.child_id, d.generation + 1 FROM d JOIN model_edges e ON e.parent_id = d.id
                    WHERE d.generation < 1000),
                g AS (SELECT id, min(generation) AS generation FROM d
                      WHERE NOT list_contains(?::VARCHAR[], id) GROUP BY id)
                SELECT {_CK}, g.generation, p.run_id, r.method
                FROM g JOIN checkpoints c ON c.id = g.id
                LEFT JOIN producers p ON p.output_id = c.id LEFT JOIN runs r ON r.id = p.run_id
                ORDER BY g.generation, c.registered_at, c.id""", [roots, roots])

    def best(self, task: str, metric: str | None = None, split: str | None = None) -> list[dict]:
        """Checkpoints ranked on their latest score for a task (per split; direction from the metric)."""
        split = _split(split) if split else None
        with self._read() as con:
            metrics = [r[0] for r in con.execute(
                "SELECT DISTINCT metric FROM latest_scores WHERE task = ? AND (?::VARCHAR IS NULL OR split = ?) "
                "ORDER BY 1", [task, split, split]).fetchall()]
            if not metrics:
                tasks = [r[0] for r in con.execute("SELECT DISTINCT task FROM evaluations ORDER BY 1").fetchall()]
                where = f" on split {split}" if split else ""
                raise CatalogError(f"no evaluations of task {task!r}{where}",
                                   hint=f"tasks with scores: {', '.join(tasks) or 'none yet'}")
            if metric is None and len(metrics) > 1:
                raise CatalogError(f"task {task!r} has several metrics ({', '.join(metrics)}); pick one with --metric")
            metric = metric or metrics[0]
            if metric not in metrics:
                raise CatalogError(f"task {task!r} has no scores for metric {metric!r} (it has {', '.join(metrics)})")
            return db.rows(con, """
                SELECT rank() OVER (PARTITION BY s.split ORDER BY
                           CASE WHEN coalesce(s.higher_is_better, true) THEN -s.value ELSE s.value END) AS rank,
                       c.id AS checkpoint_id, c.name || '@v' || c.version AS label, c.kind, c.uri,
                       s.suite, s.task, s.split, s.metric, s.value, s.higher_is_better, s.normalized_value,
                       s.normalized_against, s.num_examples, s.recorded_at
                FROM latest_scores s JOIN checkpoints c ON c.id = s.checkpoint_id
                WHERE s.task = ? AND s.metric = ? AND (?::VARCHAR IS NULL OR s.split = ?)
                ORDER BY s.split, rank, label""", [task, metric, split, split])

    def runs(self, status: str | None = None, limit: int | None = None, recipe_name: str | None = None) -> list[dict]:
        """Merge runs, newest first, with their inputs in order."""
        if status:
            _choice(status, STATUSES, "run status")
        with self._read() as con:
            return self._runs(
                con, "WHERE (?::VARCHAR IS NULL OR r.status = ?) AND (?::VARCHAR IS NULL OR r.recipe_name = ?)",
                [status, status, recipe_name, recipe_name], limit,
            )

    def last_successful_run(self, recipe_name: str) -> dict | None:
        """The newest succeeded run of a recipe, with its inputs' URIs and identities (to skip unchanged work)."""
        found = self.runs(status="succeeded", limit=1, recipe_name=recipe_name)
        return found[0] if found else None

    def _runs(self, con, where: str, params: list, limit: int | None = None) -> list[dict]:
        runs = db.rows(con, f"""
            SELECT r.*, date_diff('millisecond', r.started_at, r.ended_at) / 1000.0 AS duration_s,
                   b.name || '@v' || b.version AS base_label, b.uri AS base_uri, b.identity AS base_identity,
                   o.name || '@v' || o.version AS output_label, o.uri AS output_uri, o.identity AS output_identity
            FROM runs r LEFT JOIN checkpoints b ON b.id = r.base_id LEFT JOIN checkpoints o ON o.id = r.output_id
            {where} ORDER BY r.started_at DESC, r.id DESC {'' if limit is None else f'LIMIT {int(limit)}'}""", params)
        inputs = db.rows(con, """
            SELECT i.run_id, i.position, i.checkpoint_id, c.name || '@v' || c.version AS label, c.uri, c.identity,
                   i.weight, i.parameters
            FROM run_inputs i JOIN checkpoints c ON c.id = i.checkpoint_id
            WHERE list_contains(?::VARCHAR[], i.run_id) ORDER BY i.run_id, i.position""", [[r["id"] for r in runs]])
        by_run: dict[str, list] = {}
        for i in inputs:
            by_run.setdefault(i.pop("run_id"), []).append(i)
        return [{**r, "inputs": by_run.get(r["id"], [])} for r in runs]

    def sql(self, query: str) -> list[dict]:
        """Run SQL on a read-only connection with file access off: anything that writes is refused."""
        with db.sql_connection(self.path, timeout=self.timeout) as con:
            try:
                return db.rows(con, query)
            except duckdb.Error as exc:
                message = str(exc).strip().splitlines()[0]  # DuckDB adds a caret diagram below
                if isinstance(exc, (duckdb.InvalidInputException, duckdb.PermissionException)) and (
                    "read-only" in message or "disabled" in message
                ):
                    raise CatalogError(f"catalog sql is read-only: {message}") from None
                raise CatalogError(f"sql: {message}") from None

    def export(self, dest: str) -> list[str]:
        """Write every table to `<dest>/<table>.parquet`, dest a local directory or s3://bucket/prefix."""
        s3 = str(dest).startswith("s3://")
        if s3:
            from storage.s3 import client, split_s3_uri

            bucket, prefix = split_s3_uri(str(dest))
            out = Path(tempfile.mkdtemp(prefix="mergeline-export-"))
        else:
            out = Path(dest).expanduser()
            out.mkdir(parents=True, exist_ok=True)
        try:
            with self._read() as con:
                tables = [r[0] for r in con.execute(
                    "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                    "AND schema_name = 'main' ORDER BY table_name").fetchall()]
                files = []
                for table in tables:
                    target = out / f"{table}.parquet"
                    con.execute(f"""COPY "{table}" TO '{str(target).replace("'", "''")}' (FORMAT parquet)""")
                    files.append(target)
            if not s3:
                return [str(f) for f in files]
            keys = [f"{prefix.rstrip('/')}/{f.name}".lstrip("/") for f in files]
            for f, key in zip(files, keys):
                client().upload_file(str(f), bucket, key)
            return [f"s3://{bucket}/{key}" for key in keys]
        finally:
            if s3:
                shutil.rmtree(out, ignore_errors=True)
