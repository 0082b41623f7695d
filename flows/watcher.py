"""The watcher: scan experts prefixes, register what landed, announce it, merge what selects it.

One scan (one run of the `watch-experts` flow, on an interval schedule):

1. List each watched prefix (those given, plus every recipe's `models_from` prefix) and sort its
   folders into complete experts and pending ones (flows/selection.py, the landing convention).
   A folder without its completion marker, or whose marker disagrees with the listing, is pending
   and nothing else happens to it.
2. A complete expert whose listing changed since the last scan (or never seen) is opened from its
   headers; its identity (the weight files' URIs, sizes, ETags/versions) is registered in the
   catalog (idempotent by (uri, identity); new content at the same URI is the next version).
3. An identity the watcher has not announced before has *landed*: the Prefect event
   `mergeline.expert.landed` is emitted (resource `mergeline.expert.<uri>`, labels with the URI,
   identity and catalog version; the event id is derived from URI, identity and how many landings
   the URI had before, so a revert to earlier content lands again) and every
   configured recipe that selects it is merged (flows/nightly.py:merge_if_changed): in-process as
   a subflow by default, or, with `merge_deployment`, as a run of that deployment created with
   `run_deployment` (idempotency key from the inputs), so merges run on the GPU pool.
4. Only then is the landing recorded in the watcher's landing log, a small SQLite file beside the
   catalog: a scan that dies half-way re-announces on the next one rather than losing a landing.

The landing log, not the catalog, says what was announced: an output that mergeline itself
published under the experts prefix is registered in the catalog (as 'merged') before any scan
sees it, and must still be announced once as a landed expert.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.runtime import flow_run

import storage
from storage.catalog import Catalog
from storage.errors import CheckpointError, StorageError

from .nightly import ProblemsFound, merge_if_changed
from .selection import (
    ExpertScan,
    LandedExpert,
    load_recipes,
    resolve_recipe,
    scan_experts,
    selected_uris,
    watched_prefixes,
)

LANDED_EVENT = "mergeline.expert.landed"


class LandingLog:
    """The watcher's memory: each expert URI's last listing fingerprint, and every landing announced."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS landings (uri TEXT NOT NULL, identity TEXT NOT NULL, checkpoint_id TEXT, "
                "label TEXT, landed_at TEXT NOT NULL, flow_run_id TEXT, PRIMARY KEY (uri, identity))")
            con.execute(
                "CREATE TABLE IF NOT EXISTS seen (uri TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, identity TEXT NOT NULL)")

    @classmethod
    def beside(cls, catalog_path: Path) -> LandingLog:
        return cls(catalog_path.with_name(catalog_path.stem + ".landings.sqlite"))

    @contextlib.contextmanager
    def _connect(self):
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def seen(self, uri: str) -> tuple[str, str] | None:
        """(fingerprint, identity) of the listing last seen at uri."""
        with self._connect() as con:
            return con.execute("SELECT fingerprint, identity FROM seen WHERE uri = ?", [uri]).fetchone()

    def announced(self, uri: str, identity: str) -> bool:
        """Whether this identity is the one last announced at uri (content reverted to an earlier
        version's bytes is a landing again)."""
        with self._connect() as con:
            last = con.execute("SELECT identity FROM landings WHERE uri = ? ORDER BY landed_at DESC LIMIT 1",
                               [uri]).fetchone()
        return last is not None and last[0] == identity

    def landing_count(self, uri: str) -> int:
        with self._connect() as con:
            return con.execute("SELECT count(*) FROM landings WHERE uri = ?", [uri]).fetchone()[0]

    def remember(self, uri: str, fingerprint: str, identity: str) -> None:
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO seen VALUES (?, ?, ?)", [uri, fingerprint, identity])

    def record(self, landing: dict, flow_run_id: str | None) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO landings VALUES (?, ?, ?, ?, ?, ?)",
                [landing["uri"], landing["identity"], landing["checkpoint_id"], landing["label"],
                 datetime.now(UTC).isoformat(), flow_run_id],
            )
            con.execute("INSERT OR REPLACE INTO seen VALUES (?, ?, ?)",
                        [landing["uri"], landing["fingerprint"], landing["identity"]])

    def landings(self) -> list[dict]:
        with self._connect() as con:
            cur = con.execute("SELECT * FROM landings ORDER BY landed_at")
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]


def detect_landing(expert: LandedExpert, catalog: Catalog, log: LandingLog) -> dict | None:
    """Register a complete expert; a dict describing it when its identity is not announced yet."""
    seen = log.seen(expert.uri)
    if seen and seen[0] == expert.fingerprint and log.announced(expert.uri, seen[1]):
        return None  # listing unchanged since it was announced: no header reads
    ck = storage.open_checkpoint(expert.uri)
    checkpoint_id = catalog.register_checkpoint(
        ck.uri, kind="expert", name=expert.name, identity=ck.identity, model_type=ck.model_type,
        param_count=ck.param_count, dtype=str(ck.config.get("torch_dtype") or ck.config.get("dtype")),
        tags=list(expert.tags), metadata={"landed": {"fingerprint": expert.fingerprint, "files": list(expert.files)}},
    )
    if log.announced(ck.uri, ck.identity):  # e.g. only the marker was rewritten
        log.remember(ck.uri, expert.fingerprint, ck.identity)
        return None
    row = catalog.find_checkpoint(checkpoint_id)
    return {
        "name": expert.name, "uri": ck.uri, "identity": ck.identity, "checkpoint_id": checkpoint_id,
        "version": row["version"], "label": row["label"], "kind": row["kind"], "tags": list(expert.tags),
        "fingerprint": expert.fingerprint,
        # the same after a crash before record(), different for a revert to an earlier identity
        "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL,
                                   f"{LANDED_EVENT}:{ck.uri}#{ck.identity}#{log.landing_count(ck.uri)}")),
    }


def announce(landing: dict) -> None:
    """The `mergeline.expert.landed` event (deterministic id: a repeat after a crash is the same event)."""
    emit_event(
        event=LANDED_EVENT,
        resource={
            "prefect.resource.id": f"mergeline.expert.{landing['uri']}",
            "prefect.resource.name": landing["label"],
            "mergeline.expert.uri": landing["uri"],
            "mergeline.expert.identity": landing["identity"],
            "mergeline.expert.version": str(landing["version"]),
        },
        payload={k: landing[k] for k in ("uri", "identity", "name", "version", "label", "checkpoint_id", "tags")},
        id=uuid.UUID(landing["event_id"]),
    )


@flow(name="watch-experts", log_prints=True)
def watch_experts(
    recipes: list[str] | str | None = None,
    experts: list[str] | str | None = None,
    catalog_path: str | None = None,
    merge_deployment: str | None = None,
    runner: str = "threads",
    address: str | None = None,
    workers: int = 4,
) -> dict:
    """One scan: register and announce newly landed experts; merge every recipe that selects one.

    recipes: recipe files, directories or S3 prefixes of recipe YAML. experts: prefixes to watch
    besides the recipes' models_from prefixes. merge_deployment: "flow/deployment" to run merges
    on (run_deployment); None merges here, one recipe after another, as subflows.
    """
    logger = get_run_logger()
    loaded, errors = load_recipes(recipes) if recipes else ([], [])
    for e in errors:
        logger.error("recipe not loaded: %s", e)
    prefixes = watched_prefixes(experts, loaded)
    if not prefixes:
        why = f" (recipes not loaded: {'; '.join(errors)})" if errors else ""
        raise ProblemsFound(f"nothing to watch: give --experts PREFIX, or recipes with models_from{why}",
                            {"scanned": {}, "landed": [], "merges": [], "errors": errors})
    catalog = Catalog(catalog_path)
    log = LandingLog.beside(catalog.path)
    scans: dict[str, ExpertScan] = {p: scan_experts(p) for p in prefixes}

    landed: list[dict] = []
    for scan in scans.values():
        for name, why in scan.pending.items():
            logger.info("pending %s/%s: %s", scan.prefix, name, why)
        for name, expert in list(scan.complete.items()):
            try:
                landing = detect_landing(expert, catalog, log)
            except (CheckpointError, StorageError) as exc:   # complete by marker, but not a valid checkpoint
                logger.warning("%s: not registered: %s", expert.uri, exc)
                del scan.complete[name]
                scan.pending[name] = f"invalid: {exc}"
                continue
            if landing:
                logger.info("landed %s (%s, identity %s)", landing["label"], landing["uri"], landing["identity"][:12])
                landed.append(landing)

    for landing in landed:
        announce(landing)

    merges: list[dict] = []
    for recipe in loaded:
        try:
            selected = selected_uris(recipe, scans)
            hits = [x for x in landed if x["uri"] in selected]
            if not hits:
                continue
            scope = "landed-" + uuid.uuid5(uuid.NAMESPACE_URL, " ".join(sorted(x["event_id"] for x in hits))).hex[:12]
            hits = [x["label"] for x in hits]
            concrete = resolve_recipe(recipe, scans)
            logger.info("%s selects %s: merging", recipe.name, ", ".join(hits))
            result = merge_if_changed(
                concrete, trigger="new-expert", catalog_path=catalog_path, scans=scans, record_skip=False,
                merge_deployment=merge_deployment, idempotency_scope=scope, runner=runner, address=address,
                workers=workers,
            )
        except Exception as exc:  # noqa: BLE001 - the other recipes still merge; the run fails at the end
            logger.error("%s: %s: %s", recipe.name, type(exc).__name__, exc)
            errors.append(f"{recipe.name}: {type(exc).__name__}: {exc}")
            merges.append({"recipe": recipe.name, "action": "failed", "error": str(exc)})
            continue
        merges.append({**result, "because": hits})
        logger.info("%s: %s", recipe.name, result["action"])

    run_id = str(flow_run.id) if flow_run.id else None
    for landing in landed:   # last: a crash before this re-announces next scan instead of losing it
        log.record(landing, run_id)

    summary = {
        "scanned": {p: {"complete": sorted(s.complete), "pending": dict(s.pending)} for p, s in scans.items()},
        "landed": landed, "merges": merges, "errors": errors,
    }
    if errors:
        raise ProblemsFound(f"watcher: {len(errors)} problem(s): " + "; ".join(errors), summary)
    return summary
