"""`make bench`: mergeline's speed and memory on synthetic Llama checkpoints, against mergekit.

    python -m benchmarks.run [--params 250M] [--methods ties,linear] [--repeats 1] [--no-mergekit]
                             [--no-scale] [--workers 4] [--docs | --no-docs]

Every merge runs through the command line users run (`mergeline merge` on local files), in its own
process, measured from outside (wall time, CPU time, peak RSS). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import checkpoints as ck
from . import report
from .compare import compare, ties_threshold_stats
from .measure import Measurement, run_measured
from .prefect_env import PrefectServer, empty_flow
from .recipes import DETERMINISTIC, METHODS, SEED, write_configs

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(os.environ.get("BENCH_DIR", ROOT / ".bench"))
MERGEKIT_VENV = Path(os.environ.get("MERGEKIT_VENV", BENCH / "mergekit-venv"))
DEFAULT_PARAMS = "250M"
GB = 1e9


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=DEFAULT_PARAMS, help="model size, e.g. 60M, 250M, 1B (default 250M)")
    p.add_argument("--experts", type=int, default=4, help="experts merged onto the base (default 4)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per tool and method, alternating tools")
    p.add_argument("--workers", type=int, default=None, help="mergeline --workers (default: the CLI's own default)")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit even if `make bench-setup` installed it")
    p.add_argument("--no-scale", action="store_true", help="skip the runs at twice the model size (deeper, and wider)")
    p.add_argument("--scale-mergekit", action="store_true", help="run mergekit in the scale run too")
    p.add_argument("--no-explain", action="store_true",
                   help="skip what explains output differences (a mergekit float32 run, TIES threshold ties)")
    p.add_argument("--ephemeral", action="store_true",
                   help="time mergeline with Prefect's ephemeral API (no PREFECT_API_URL) instead of a local server")
    p.add_argument("--out-dir", default=None, help="where merged outputs go (default: /dev/shm if it has room)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a single run is killed")
    docs = p.add_mutually_exclusive_group()
    docs.add_argument("--docs", dest="docs", action="store_true", default=None, help="write docs/benchmarks.md")
    docs.add_argument("--no-docs", dest="docs", action="store_false",
                      help="do not write docs/benchmarks.md (default for non-default sizes/methods)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return args


# ---------------------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "commit": commit, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def loadavg() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return float("nan")


def mergekit_bin() -> Path | None:
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    return exe if exe.exists() else None


def mergekit_version() -> str:
    py = MERGEKIT_VENV / "bin" / "python"
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), "
                        "m.version('torch'))"], capture_output=True, text=True)
    return r.stdout.strip()


# ---------------------------------------------------------------------------------------------- floors


def read_floor(files: list[Path], repeats: int = 3) -> dict:
    """Reading every input once from the page cache (warmed first): one thread, 1 MiB reads into one buffer."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)

    def read_all() -> int:
        n = 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while (got := fh.readinto(view)) > 0:
                    n += got
        return n

    read_all()  # warm the page cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = read_all()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"bytes": n, "seconds": best, "gb_s": n / best / GB, "samples": times}


# ---------------------------------------------------------------------------------------------- runs


class Runner:
    def __init__(self, args, out_root: Path, prefect_env: dict):
        self.args = args
        self.out_root = out_root
        self.prefect_env = prefect_env
        exe = Path(sys.executable).parent / "mergeline"
        self.mergeline = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
        self.mergekit = mergekit_bin()

    def mergeline_run(self, recipe: Path, label: str) -> tuple[Measurement, dict, Path]:
        out = self.out_root / f"ml-{label}"
        shutil.rmtree(out, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="bench-ml-", dir=BENCH / "tmp") as tmp:
            env = {**os.environ, **self.prefect_env, "PREFECT_LOCAL_STORAGE_PATH": str(Path(tmp) / "results")}
            cmd = [*self.mergeline, "merge", str(recipe), "--output", str(out), "--catalog",
                   str(Path(tmp) / "catalog.duckdb"), "--json"]
            if self.args.workers:
                cmd += ["--workers", str(self.args.workers)]
            m = run_measured(cmd, env=env, timeout=self.args.timeout)
        if m.returncode != 0:
            raise RuntimeError(f"mergeline failed ({m.returncode}) on {recipe}:\n{m.stderr[-3000:]}")
        summary = _last_json(m.stdout)
        if summary.get("cached"):
            raise RuntimeError(f"mergeline served {summary['cached']} from cache: the timing would be meaningless")
        return m, summary, out

    def mergekit_run(self, config: Path, label: str) -> tuple[Measurement, Path]:
        out = self.out_root / f"mk-{label}"
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        cmd = [str(self.mergekit), str(config), str(out), "--lazy-unpickle", "--no-copy-tokenizer", "--quiet",
               "--random-seed", str(SEED)]
        m = run_measured(cmd, env=env, timeout=self.args.timeout)
        if m.returncode != 0:
            raise RuntimeError(f"mergekit failed ({m.returncode}) on {config}:\n{m.stderr[-3000:]}")
        return m, out


def _last_json(stdout: str) -> dict:
    lines = stdout.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    raise RuntimeError(f"no JSON summary in mergeline's output:\n{stdout[-2000:]}")


def _sample(m: Measurement, summary: dict | None = None) -> dict:
    d = {"wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_rss": m.peak_rss_bytes, "peak_anon": m.peak_anon_bytes}
    if summary is not None:
        d["flow"] = summary.get("timings", {})
    return d


def _median(samples: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def bench_size(args, runner: Runner, base: Path, experts: list[Path], tag: str, with_mergekit: bool,
               explain: bool) -> dict:
    """Every method at one model size: timed runs (alternating tools), then output comparison."""
    input_bytes = {"with_base": ck.total_bytes([base, *experts]), "experts": ck.total_bytes(experts)}
    results: dict[str, dict] = {}
    cfg_dir = BENCH / "configs" / tag
    for mi, method in enumerate(args.methods):
        cfgs = write_configs(method, base, experts, cfg_dir)
        uses_base = method != "linear"
        res = {"input_bytes": input_bytes["with_base" if uses_base else "experts"], "mergeline": [], "mergekit": []}
        ml_out = mk_out = None
        for r in range(args.repeats):
            order = ["mergeline", "mergekit"] if (mi + r) % 2 == 0 else ["mergekit", "mergeline"]
            for tool in order:
                if tool == "mergeline":
                    m, summary, ml_out = runner.mergeline_run(cfgs["mergeline"], f"{tag}-{method}")
                    res["mergeline"].append(_sample(m, summary))
                elif with_mergekit:
                    m, mk_out = runner.mergekit_run(cfgs["mergekit"], f"{tag}-{method}")
                    res["mergekit"].append(_sample(m))
                else:
                    continue
                log(f"  {tag} {method:16s} {tool:9s} run {r + 1}: {m.wall_s:7.1f} s wall, {m.cpu_s:7.1f} s CPU, "
                    f"peak RSS {m.peak_rss_bytes / 2**30:5.2f} GiB (load {loadavg():.1f})")
        if with_mergekit and method in DETERMINISTIC and ml_out and mk_out:
            res["compare"] = compare(ml_out, mk_out, base)
            c = res["compare"]
            log(f"  {tag} {method:16s} outputs: task-vector cosine {c['cosine']:.6f}, "
                f"max |diff| {c['max_abs_diff']:.3g}, {100 * c['differing_fraction']:.2f}% of weights differ")
            if explain and method == "task_arithmetic":  # mergekit computing in float32, like mergeline
                m, fp_out = runner.mergekit_run(cfgs["mergekit_fp32"], f"{tag}-{method}-fp32")
                res["explain"] = {"mergekit_fp32_vs_mergeline": compare(ml_out, fp_out, base),
                                  "mergekit_fp32_run": _sample(m)}
                e = res["explain"]["mergekit_fp32_vs_mergeline"]
                log(f"  {tag} {method:16s} vs mergekit in float32: cosine {e['cosine']:.6f}, "
                    f"max |diff| {e['max_abs_diff']:.3g}, {100 * e['differing_fraction']:.2f}% differ")
                shutil.rmtree(fp_out, ignore_errors=True)
            if explain and method == "ties":
                st = res["explain"] = {"ties_at_threshold": ties_threshold_stats(base, experts, 0.2)}
                t = st["ties_at_threshold"]
                log(f"  {tag} {method:16s} {100 * t['tied_fraction']:.2f}% of entries tie with the threshold: "
                    f"mergeline keeps {100 * t['kept_mergeline']:.2f}%, mergekit {100 * t['kept_mergekit']:.2f}%")
        for out in (ml_out, mk_out):
            if out:
                shutil.rmtree(out, ignore_errors=True)
        results[method] = res
    return results


def disk_run(runner: Runner, base: Path, experts: list[Path], tag: str) -> dict:
    """Linear once more with the output on this machine's disk instead of tmpfs (mergeline fsyncs shards)."""
    cfgs = write_configs("linear", base, experts, BENCH / "configs" / tag)
    saved = runner.out_root
    runner.out_root = BENCH / "out-disk"
    runner.out_root.mkdir(parents=True, exist_ok=True)
    try:
        m, summary, out = runner.mergeline_run(cfgs["mergeline"], f"{tag}-linear-disk")
        shutil.rmtree(out, ignore_errors=True)
    finally:
        runner.out_root = saved
    log(f"  {tag} linear, output on disk: {m.wall_s:.1f} s wall")
    return _sample(m, summary)


def pick_out_dir(args, need_bytes: int) -> Path:
    if args.out_dir:
        return Path(args.out_dir)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > need_bytes:
            return shm / f"mergeline-bench-{os.getpid()}"
    return BENCH / "out"


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    default_run = (args.params == DEFAULT_PARAMS and args.methods == list(METHODS) and not args.no_scale
                   and args.experts == 4)
    write_docs = default_run if args.docs is None else args.docs
    BENCH.mkdir(parents=True, exist_ok=True)
    (BENCH / "tmp").mkdir(exist_ok=True)
    started = time.perf_counter()
    info = machine_info()
    info["load_before"] = loadavg()
    with_mergekit = mergekit_bin() is not None and not args.no_mergekit
    if with_mergekit:
        info["mergekit"] = mergekit_version()
    elif not args.no_mergekit:
        log("mergekit is not installed (run `make bench-setup`): timing mergeline alone")

    shape = ck.shape_for(ck.parse_count(args.params))
    sizes = [("1x", shape)]
    if not args.no_scale:
        sizes.append(("2x", ck.shape_for(2 * shape.params, hidden=shape.hidden)))
        sizes.append(("2x-wide", ck.shape_for(2 * shape.params, hidden=ck.wider(shape.hidden))))
    data = {}
    for tag, s in sizes:
        root = BENCH / "ckpt" / f"llama-{s.hidden}x{s.layers}-e{args.experts}"
        base, experts = ck.generate(root, s, experts=args.experts, log=log)
        data[tag] = (s, base, experts)
    out_root = pick_out_dir(args, 3 * 2 * max(s.params for _, s in sizes))
    out_root.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": info, "command": _command(argv), "args": vars(args), "sizes": {}}
    try:
        server_ctx = None if args.ephemeral else PrefectServer(
            sys.executable, BENCH / "prefect-home", BENCH / "prefect-server.log")
        if server_ctx:
            server_ctx.__enter__()
            log(f"Prefect server for the timed runs: {server_ctx.url} (up in {server_ctx.startup_s:.0f} s)")
        try:
            prefect_env = server_ctx.env() if server_ctx else {}
            results["prefect"] = prefect_costs(prefect_env)
            runner = Runner(args, out_root, prefect_env)
            results["startup"] = startup_costs(runner, with_mergekit)
            for tag, (s, base, experts) in data.items():
                log(f"== {tag}: {s.describe()}")
                floor = read_floor(ck.input_files([base, *experts]))
                log(f"  read floor: {floor['bytes'] / GB:.2f} GB in {floor['seconds']:.2f} s "
                    f"({floor['gb_s']:.2f} GB/s, one thread, page cache)")
                mk = with_mergekit and (tag == "1x" or args.scale_mergekit)
                size = {"shape": s.__dict__ | {"params": s.params, "largest": s.largest}, "floor": floor,
                        "methods": bench_size(args, runner, base, experts, tag, mk,
                                              explain=mk and not args.no_explain and tag == "1x")}
                if tag == "1x" and "linear" in args.methods:
                    size["disk_linear"] = disk_run(runner, base, experts, tag)
                results["sizes"][tag] = size
        finally:
            if server_ctx:
                server_ctx.__exit__(None, None, None)
    finally:
        if out_root.parent == Path("/dev/shm"):
            shutil.rmtree(out_root, ignore_errors=True)
    info["load_after"] = loadavg()
    results["elapsed_s"] = time.perf_counter() - started
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (BENCH / "results").mkdir(exist_ok=True)
    raw = BENCH / "results" / f"bench-{stamp}.json"
    raw.write_text(json.dumps(results, indent=2, default=str))
    md = report.render(results)
    (BENCH / "results" / "latest.md").write_text(md)
    print()
    print(md)
    if write_docs:
        report.write_docs(ROOT / "docs" / "benchmarks.md", md)
        log(f"wrote docs/benchmarks.md (raw results: {raw.relative_to(ROOT) if raw.is_relative_to(ROOT) else raw})")
    else:
        log(f"results: {raw} and {BENCH / 'results' / 'latest.md'} (docs/benchmarks.md untouched; --docs to write)")
    return 0


def prefect_costs(server_env: dict) -> dict:
    """What Prefect itself costs a `mergeline merge`: an empty flow with the server the timed runs use,
    and with the ephemeral API (no PREFECT_API_URL) that a bare `mergeline merge` starts."""
    out: dict = {}
    py = sys.executable
    if server_env:
        samples = [empty_flow(py, {**os.environ, **server_env}) for _ in range(2)]
        out["server"] = _flow_costs(samples)
        log(f"  empty flow with the Prefect server: {out['server']['wall_s']:.1f} s "
            f"(import {out['server']['import_s']:.1f} s)")
    # Prefect's default 20 s for the ephemeral server to answer is too short on a loaded 2-core machine.
    eph_env = {**os.environ, "PREFECT_HOME": str(BENCH / "prefect-ephemeral-home"),
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    eph_env.pop("PREFECT_API_URL", None)
    try:
        samples = [empty_flow(py, eph_env) for _ in range(2)]  # the first one also creates the database
    except RuntimeError as exc:
        out["ephemeral_error"] = str(exc)[-500:]
        log(f"  empty flow with the ephemeral API failed: {str(exc)[-200:]}")
        return out
    out["ephemeral"] = _flow_costs(samples[1:])
    out["ephemeral_first"] = _flow_costs(samples[:1])
    log(f"  empty flow with the ephemeral API: {out['ephemeral']['wall_s']:.1f} s")
    return out


def startup_costs(runner: Runner, with_mergekit: bool) -> dict:
    """Each tool's start-up before any work: the interpreter and the imports its merge needs.
    mergekit-yaml --help imports all of mergekit; mergeline's --help imports neither torch nor
    Prefect, so it is timed as importing its merge flow and layer task instead."""
    cmds = {"mergeline": [sys.executable, "-c", "import os, flows.cli, flows.merge_flow, flows.unit; os._exit(0)"]}
    if with_mergekit:
        cmds["mergekit"] = [str(runner.mergekit), "--help"]
    out = {}
    for tool, cmd in cmds.items():
        best = min((run_measured(cmd, timeout=600) for _ in range(2)), key=lambda m: m.wall_s)
        out[tool] = {"wall_s": best.wall_s, "cpu_s": best.cpu_s, "peak_rss": best.peak_rss_bytes}
        log(f"  {tool} start-up: {best.wall_s:.1f} s")
    return out


def _flow_costs(samples) -> dict:
    best = min(samples, key=lambda s: s[0].wall_s)
    return {"wall_s": best[0].wall_s, "cpu_s": best[0].cpu_s, "import_s": best[1], "flow_s": best[2],
            "peak_rss": best[0].peak_rss_bytes, "samples": [s[0].wall_s for s in samples]}


def _command(argv) -> str:
    tail = " ".join(sys.argv[1:] if argv is None else argv)
    if os.environ.get("MAKELEVEL"):  # run by `make bench BENCH_ARGS=...`
        return "make bench" + (f' BENCH_ARGS="{tail}"' if tail else "")
    return "python -m benchmarks.run" + (f" {tail}" if tail else "")


if __name__ == "__main__":
    sys.exit(main())
