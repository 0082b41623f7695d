"""Catalog schema: numbered migrations applied in order on open, and views rebuilt after them.

No FOREIGN KEY constraints: DuckDB refuses ALTER TABLE on a table that others reference, which
would block migrations. References are checked by the write methods instead, inside the same
transaction and under the writer lock.
"""

from __future__ import annotations

from datetime import UTC, datetime

# Metrics where lower is better, when the recorder does not say (used to backfill v1 rows too).
LOWER_IS_BETTER = ("perplexity", "ppl", "loss", "nll", "error", "wer", "cer", "bpb")
_LOWER_SQL = "regexp_matches(lower(metric), '" + "|".join(LOWER_IS_BETTER) + "')"

V1 = """
CREATE TABLE schema_version (
    version INTEGER PRIMARY KEY, description VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL);
CREATE TABLE checkpoints (
    id VARCHAR PRIMARY KEY, uri VARCHAR NOT NULL,
    kind VARCHAR NOT NULL CHECK (kind IN ('base', 'expert', 'merged')),
    name VARCHAR NOT NULL, version INTEGER NOT NULL, identity VARCHAR NOT NULL,
    model_type VARCHAR, param_count BIGINT, dtype VARCHAR,
    tags VARCHAR[] NOT NULL DEFAULT [], metadata JSON, registered_at TIMESTAMP NOT NULL,
    UNIQUE (uri, identity), UNIQUE (name, version));
CREATE TABLE runs (
    id VARCHAR PRIMARY KEY, recipe_name VARCHAR NOT NULL, method VARCHAR NOT NULL,
    parameters JSON, recipe_text VARCHAR, recipe_digest VARCHAR, base_id VARCHAR, output_id VARCHAR,
    code_version VARCHAR, flow_run_id VARCHAR, trigger VARCHAR NOT NULL,
    status VARCHAR NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'skipped')),
    error VARCHAR, started_at TIMESTAMP NOT NULL, ended_at TIMESTAMP);
CREATE TABLE run_inputs (
    run_id VARCHAR NOT NULL, position INTEGER NOT NULL, checkpoint_id VARCHAR NOT NULL,
    weight DOUBLE, parameters JSON, PRIMARY KEY (run_id, position));
CREATE TABLE evaluations (
    id VARCHAR PRIMARY KEY, checkpoint_id VARCHAR NOT NULL, suite VARCHAR NOT NULL,
    task VARCHAR NOT NULL, split VARCHAR NOT NULL, metric VARCHAR NOT NULL, value DOUBLE NOT NULL,
    normalized_value DOUBLE, normalized_against VARCHAR, num_examples INTEGER, data_digest VARCHAR,
    flow_run_id VARCHAR, recorded_at TIMESTAMP NOT NULL);
"""

V2 = f"""
ALTER TABLE runs ADD COLUMN timings JSON;
ALTER TABLE evaluations ADD COLUMN higher_is_better BOOLEAN;
UPDATE evaluations SET higher_is_better = NOT {_LOWER_SQL};
"""

# seen_at: when this identity was last found at its URI. A URI whose content returns to an
# earlier identity (an expert reverted) makes that row its latest again; registered_at stays.
# target_uri, writing_since: where a merge run publishes, and since when it holds that output's
# lock. A run that took the lock over finds the earlier holders still 'running' (killed) and
# fails them, instead of their staying 'running' for ever.
V3 = """
ALTER TABLE checkpoints ADD COLUMN seen_at TIMESTAMP;
UPDATE checkpoints SET seen_at = registered_at;
ALTER TABLE runs ADD COLUMN target_uri VARCHAR;
ALTER TABLE runs ADD COLUMN writing_since TIMESTAMP;
UPDATE runs SET target_uri = (SELECT uri FROM checkpoints c WHERE c.id = runs.output_id);
"""

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "checkpoints, runs, run_inputs, evaluations", V1),
    (2, "runs.timings; evaluations.higher_is_better (backfilled from the metric name)", V2),
    (3, "checkpoints.seen_at (backfilled from registered_at); runs.target_uri, runs.writing_since", V3),
]
LATEST = MIGRATIONS[-1][0]

# Views hold no data, so they are simply recreated whenever the tables change shape.
VIEWS = """
CREATE OR REPLACE VIEW producers AS
    SELECT output_id, id AS run_id FROM runs
    WHERE status = 'succeeded' AND output_id IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY output_id ORDER BY ended_at, id) = 1;
CREATE OR REPLACE VIEW model_edges AS
    SELECT p.output_id AS child_id, p.run_id, r.base_id AS parent_id, 'base' AS role,
           NULL::INTEGER AS position, NULL::DOUBLE AS weight, NULL::JSON AS parameters
    FROM producers p JOIN runs r ON r.id = p.run_id WHERE r.base_id IS NOT NULL
    UNION ALL
    SELECT p.output_id, p.run_id, i.checkpoint_id, 'input', i.position, i.weight, i.parameters
    FROM producers p JOIN run_inputs i ON i.run_id = p.run_id;
CREATE OR REPLACE VIEW latest_scores AS
    SELECT * FROM evaluations
    QUALIFY row_number() OVER (
        PARTITION BY checkpoint_id, suite, task, split, metric ORDER BY recorded_at DESC, id DESC) = 1;
"""


def current_version(con) -> int:
    exists = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def migrate(con, path) -> list[int]:
    """Bring the open (read-write) database up to LATEST, one transaction per step; returns steps applied."""
    version = current_version(con)
    if version > LATEST:
        raise ValueError(
            f"catalog {path} has schema v{version}, newer than this mergeline understands (v{LATEST}); "
            "upgrade mergeline"
        )
    applied = []
    for number, description, ddl in MIGRATIONS:
        if number <= version:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(ddl)
            con.execute(VIEWS)
            con.execute(
                "INSERT INTO schema_version VALUES (?, ?, ?)",
                [number, description, datetime.now(UTC).replace(tzinfo=None)],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied
