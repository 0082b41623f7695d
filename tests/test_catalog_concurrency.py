"""Several processes record into one catalog file: nothing lost, nothing corrupted, nobody starved."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from storage.catalog import Catalog, CatalogBusy

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import sys, time
from pathlib import Path
from storage.catalog import Catalog
path, worker, n, base = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cat = Catalog(path)
Path(path + f".ready-{worker}").touch()
while not Path(path + ".go").exists():
    time.sleep(0.005)
for i in range(n):
    if i % 2:
        cat.record_evaluation(checkpoint_id=base, suite="s", task=f"task-{worker}", split="held-in",
                              metric="acc", value=i)
    else:  # all workers add versions of the same name: the version numbers must not collide
        cat.register_checkpoint(f"s3://m/{worker}/{i}", kind="merged", name="shared", identity=f"{worker}-{i}")
"""


def _spawn(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_write_100_records_each(tmp_path):
    path = tmp_path / "catalog.duckdb"
    cat = Catalog(path)
    base = cat.register_checkpoint("s3://m/base", kind="base", name="base", identity="b")
    workers = [_spawn(WORKER, path, w, 100, base) for w in ("w0", "w1")]
    deadline = time.monotonic() + 60
    while not all(Path(f"{path}.ready-{w}").exists() for w in ("w0", "w1")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in workers), [p.communicate() for p in workers]
        time.sleep(0.01)
    Path(f"{path}.go").touch()
    for p in workers:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err

    shared = cat.sql("SELECT uri, version, registered_at FROM checkpoints WHERE name = 'shared' ORDER BY version")
    assert [r["version"] for r in shared] == list(range(1, 101))  # 100 rows, no version used twice
    assert {r["uri"] for r in shared} == {f"s3://m/w{w}/{i}" for w in (0, 1) for i in range(0, 100, 2)}
    evals = cat.sql("SELECT task, list(value::INT ORDER BY value) AS v FROM evaluations GROUP BY task ORDER BY task")
    assert evals == [{"task": f"task-w{w}", "v": list(range(1, 100, 2))} for w in (0, 1)]
    # they really did write at the same time: the registration order switches writers many times
    order = [r["uri"].split("/")[3] for r in sorted(shared, key=lambda r: r["registered_at"])]
    assert sum(a != b for a, b in zip(order, order[1:])) >= 5
    assert duckdb.connect(str(path), read_only=True).execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 101


def test_writer_waits_for_the_lock_and_gives_up_after_the_timeout(tmp_path):
    path = tmp_path / "catalog.duckdb"
    cat = Catalog(path, timeout=0.3)
    fd = os.open(f"{path}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another mergeline process in the middle of a write would
    try:
        started = time.monotonic()
        with pytest.raises(CatalogBusy, match="locked by another process"):
            cat.register_checkpoint("s3://m/a", kind="expert", name="a", identity="x")
        assert time.monotonic() - started >= 0.3
    finally:
        os.close(fd)
    assert cat.register_checkpoint("s3://m/a", kind="expert", name="a", identity="x")


HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])  # ignores mergeline's lock file, like the duckdb CLI would
print(con.execute("SELECT count(*) FROM checkpoints").fetchone()[0], flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def test_catalog_is_not_held_open_and_retries_a_foreign_holder(tmp_path):
    path = tmp_path / "catalog.duckdb"
    cat = Catalog(path)
    cat.register_checkpoint("s3://m/a", kind="expert", name="a", identity="x")
    holder = _spawn(HOLDER, path, 1.0)
    assert holder.stdout.readline().strip() == "1"  # it could open the file: this process does not hold it
    started = time.monotonic()
    cat.register_checkpoint("s3://m/b", kind="expert", name="b", identity="y")  # retries until the holder leaves
    assert time.monotonic() - started > 0.3
    holder.communicate(timeout=30)
    assert holder.returncode == 0
    assert [r["name"] for r in cat.list_models()] == ["b", "a"]
