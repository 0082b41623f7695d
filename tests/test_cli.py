"""The `mergeline` console script as users run it: a separate process whose output is a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flows.cli import main
from storage.catalog import Catalog


def _mergeline(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_output_is_flushed_and_status_kept_on_fast_exit(tmp_path):
    catalog = tmp_path / "c.duckdb"
    Catalog(catalog)  # created, empty
    ok = _mergeline("catalog", "--catalog", str(catalog), "sql", "SELECT 42 AS answer", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == [{"answer": 42}]

    bad = _mergeline("merge", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2
    assert "missing.yaml" in bad.stderr

    usage = _mergeline("no-such-command")
    assert usage.returncode == 2
    assert "invalid choice" in usage.stderr


def test_help_exits_zero():
    r = _mergeline("--help")
    assert r.returncode == 0
    assert "merge" in r.stdout and "catalog" in r.stdout


def modules_loaded_by(argv: list[str], modules: tuple[str, ...], also_import: tuple[str, ...] = ()) -> list[str]:
    """Which of `modules` a fresh interpreter has loaded after `mergeline *argv` (and importing
    `also_import`)."""
    code = (
        "import contextlib, importlib, io, json, sys\n"
        "from flows.cli import main\n"
        f"for name in {list(also_import)!r}:\n"
        "    importlib.import_module(name)\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main({argv!r}) == 0\n"
        f"print(json.dumps(sorted(m for m in {list(modules)!r} if m in sys.modules)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_catalog_queries_do_not_load_torch_or_prefect(tmp_path):
    """`mergeline catalog ...` is for quick questions: it starts in well under a second because
    it never imports torch or Prefect (storage resolves its names lazily)."""
    catalog = tmp_path / "c.duckdb"
    Catalog(catalog)
    argv = ["catalog", "--catalog", str(catalog), "runs", "--json"]
    assert modules_loaded_by(argv, ("torch", "prefect", "transformers")) == []


def test_a_merge_on_prefects_ephemeral_api_ends_cleanly(tmp_path):
    """Without PREFECT_API_URL, `mergeline merge` starts Prefect's temporary API server and stops it
    as it exits: only after Prefect has sent its last logs (stopped first, every such run ended
    with '--- Error logging to API ---' after a successful merge)."""
    from tests.factory import tiny_llama_zoo

    _, experts = tiny_llama_zoo(tmp_path / "zoo", n_experts=2, layers=1)
    recipe = tmp_path / "soup.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {experts[0]}\n  - model: {experts[1]}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    r = _mergeline("merge", str(recipe), "--output", str(tmp_path / "out"), "--catalog", str(tmp_path / "c.duckdb"),
                   env=env)
    assert r.returncode == 0, r.stderr
    assert f"published {tmp_path / 'out'}" in r.stdout
    assert "Stopping temporary server" in r.stderr  # the ephemeral API was the one used
    assert "Error logging to API" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["merge", "r.yaml", "--runner", "dask"], "--runner dask needs --address"),
    (["merge", "r.yaml", "--address", "tcp://scheduler:8786"], "--address is for --runner dask"),
    (["watch", "--recipes", "r/", "--address", "tcp://scheduler:8786"], "--address is for --runner dask"),
])
def test_runner_options_are_checked_before_anything_runs(args, message, capsys):
    """Before the recipe is read (r.yaml does not exist) and before any progress bar is drawn."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mergeline: error: {message}"), err


def test_serve_watch_every_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--recipes", "r/", "--watch-every", "0"])
    assert exit_.value.code == 2 and "--watch-every: expected a number of seconds above 0" in capsys.readouterr().err
