"""The benchmark scripts still run: they are timed rarely (a GPU machine, a 20-minute run), so a
small CPU run of each keeps them from rotting between uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_units_script_merges_every_unit_and_reports_each_method(tmp_path):
    """benchmarks/gpu_units.py with --device cpu: the same plan, units and report as on a GPU."""
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_units.py"), "--device", "cpu", "--hidden", "64",
           "--params", "2M", "--experts", "2", "--repeats", "1", "--methods", "ties,dare_linear",
           "--dir", str(tmp_path / "ckpt")]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "out" / "gpu-units.json").read_text())
    inputs = sorted((tmp_path / "ckpt").glob("*/model.safetensors"))
    assert [p.parent.name for p in inputs] == ["base", "expert-0", "expert-1"]
    assert report["info"]["input_bytes"] == sum(p.stat().st_size for p in inputs)
    assert set(report["results"]) == {"ties", "dare_linear"}
    for r in report["results"].values():
        assert len(r["all_seconds"]) == 2 and r["seconds"] == min(r["all_seconds"][1:]) > 0
    table = (tmp_path / "out" / "gpu-units.md").read_text()
    assert "| ties |" in table and "| dare_linear |" in table
    assert not list((tmp_path / "ckpt").glob("tmp*")), "a pass's staging area was left behind"


def test_make_bench_runs_the_cli_and_writes_its_report(tmp_path):
    """`make bench` at a toy size, without mergekit and the scale runs: its Prefect server, the timed
    `mergeline merge` runs and the report work; docs/benchmarks.md is left alone without --docs."""
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    env = {**os.environ, "BENCH_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "benchmarks.run", "--params", "5M", "--methods", "linear", "--no-mergekit",
           "--no-scale", "--no-docs", "--repeats", "1"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    [result] = (tmp_path / "results").glob("bench-*.json")
    runs = json.loads(result.read_text())["sizes"]["1x"]["methods"]["linear"]["mergeline"]
    assert len(runs) == 1 and runs[0]["wall_s"] > 0 and runs[0]["peak_rss"] > 0
    report = (tmp_path / "results" / "latest.md").read_text()
    assert "| linear |" in report and "none measured" in report
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs
