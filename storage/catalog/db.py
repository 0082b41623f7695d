"""Opening the catalog file safely from many processes.

DuckDB lets one process write a database file at a time, and a process that holds it open blocks
every other. So nothing here keeps the file open. Each operation:

1. takes this process's thread lock (one attachment per process at a time),
2. takes an fcntl lock on a sidecar file, `<catalog>.lock`: shared for reads, exclusive for writes.
   A contended lock is waited for in the kernel (a blocking flock: the waiter gets it as soon as the
   holder lets go, rather than polling and losing every race to a busy writer), up to `timeout`;
3. ATTACHes the file to a long-lived in-memory DuckDB of this process, runs one short transaction,
   and DETACHes it, which releases the file. Attaching costs a few milliseconds where starting a
   DuckDB instance per operation costs tens;
4. retries the ATTACH with jittered backoff, up to the same timeout, while a program that ignores
   the lock file (the duckdb CLI, say) has the database open.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import fcntl
import json
import os
import random
import threading
import time
import uuid
from pathlib import Path

import duckdb

# `sql` runs user queries on a separate, hardened connection: read-only, and no file access, so
# that COPY ... TO, ATTACH and friends cannot write anywhere either.
SQL_CONFIG = {"enable_external_access": False}
ALIAS = "mergeline_catalog"

_engine_lock = threading.RLock()
_engine: tuple[int, duckdb.DuckDBPyConnection] | None = None
_abandoned: list = []  # engines inherited through fork: never touched (or closed) by the child


class CatalogBusy(TimeoutError):
    """Another process held the catalog longer than the timeout."""


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def locked(path: Path, *, exclusive: bool, timeout: float):
    """Hold the sidecar lock (fcntl.flock: released by the kernel if the process dies)."""
    try:
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(lock_path(path), os.O_RDONLY)  # a reader in a directory it cannot write
    try:
        _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout,
               f"catalog {path} is locked by another process (lock file {lock_path(path)})")
        yield
    finally:
        os.close(fd)


def _flock(fd: int, mode: int, timeout: float, message: str) -> None:
    """flock with a timeout: a helper thread blocks on a dup of fd while this one waits for it."""
    try:
        return fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        pass
    # The lock belongs to the open file description that fd and its dup share: it is held as long
    # as fd is open, and if we give up, closing fd and the dup lets it go even if it comes late.
    dup = os.dup(fd)
    done = threading.Event()
    failed: list[OSError] = []

    def wait() -> None:
        try:
            fcntl.flock(dup, mode)
        except OSError as exc:
            failed.append(exc)
        finally:
            os.close(dup)
            done.set()

    threading.Thread(target=wait, name="catalog-lock", daemon=True).start()
    if not done.wait(timeout):
        raise CatalogBusy(f"{message}; gave up after {timeout:g}s")
    if failed:
        raise failed[0]


def _after_fork_in_child() -> None:
    """A forked child must not wait on a lock some parent thread held, nor share the parent's engine."""
    global _engine, _engine_lock
    _engine_lock = threading.RLock()
    if _engine is not None:
        _abandoned.append(_engine)
        _engine = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _engine_connection() -> duckdb.DuckDBPyConnection:
    global _engine
    if _engine is None:
        _engine = (os.getpid(), duckdb.connect(":memory:"))
    return _engine[1]


def _drop_engine() -> None:
    global _engine
    if _engine is not None:
        with contextlib.suppress(duckdb.Error):
            _engine[1].close()
        _engine = None


def _conflicts(fn):
    """Turn DuckDB's 'file is locked by another process' into a retryable _Conflict."""
    try:
        return fn()
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise _Conflict(str(exc)) from exc
        raise


@contextlib.contextmanager
def session(path: Path, *, read_only: bool, timeout: float):
    """A connection with the catalog attached (and USEd) for the duration of one operation."""
    with _engine_lock, locked(path, exclusive=not read_only, timeout=timeout):
        con = _engine_connection()
        target = str(path).replace("'", "''")
        mode = " (READ_ONLY)" if read_only else ""
        _retry(lambda: _conflicts(lambda: con.execute(f"ATTACH '{target}' AS {ALIAS}{mode}")), _Conflict,
               timeout, f"catalog {path} is held open by another program")
        try:
            con.execute(f"USE {ALIAS}")
            yield con
        finally:
            try:
                con.execute("USE memory")
                con.execute(f"DETACH {ALIAS}")
            except duckdb.Error:  # leave nothing half-attached behind for the next operation
                _drop_engine()


@contextlib.contextmanager
def sql_connection(path: Path, *, timeout: float):
    """A separate read-only connection without file access, for user-supplied SQL."""
    with _engine_lock, locked(path, exclusive=False, timeout=timeout):
        con = _retry(
            lambda: _conflicts(lambda: duckdb.connect(str(path), read_only=True, config=SQL_CONFIG)),
            _Conflict, timeout, f"catalog {path} is held open by another program",
        )
        try:
            yield con
        finally:
            con.close()


class _Conflict(Exception):
    pass


def _retry(fn, retry_on, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            return fn()
        except retry_on as exc:
            if time.monotonic() >= deadline:
                raise CatalogBusy(f"{message}; gave up after {timeout:g}s ({exc})") from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)


def rows(con, query: str, params=None) -> list[dict]:
    """Run a query; rows as dicts of plain, JSON-serialisable Python (JSON columns parsed)."""
    result = con.execute(query, params or [])
    if result.description is None:
        return []
    names: list[str] = []
    for d in result.description:  # `SELECT a.id, b.id` must not lose a column: id, id_2
        name, n = d[0], 2
        while name in names:
            name, n = f"{d[0]}_{n}", n + 1
        names.append(name)
    json_cols = {i for i, d in enumerate(result.description) if str(d[1]) == "JSON"}
    return [
        {n: (json.loads(v) if i in json_cols and v is not None else plain(v)) for i, (n, v) in enumerate(zip(names, r))}
        for r in result.fetchall()
    ]


def plain(v):
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v
