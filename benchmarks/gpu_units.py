"""A GPU worker's merge from files: every layer unit of a plan through flows.unit.run_unit, on CUDA.

    python benchmarks/gpu_units.py [--params 1B] [--experts 4] [--workers 4] [--budget-mb 16384]
    python benchmarks/gpu_units.py --device cpu --hidden 64 --params 2M   # checks the script, no GPU

benchmarks/gpu.py times the merge kernels on tensors already in memory; this times what a GPU
worker does with a recipe that says `device: cuda`: read each tensor of a unit from the checkpoint
files, copy it to the GPU, merge, copy the result back and write the shard. Units run in a pool of
--workers threads, as the flow's tasks run on one worker (without Prefect). The checkpoints
(bf16, Llama-7B widths: hidden 4096, MLP 11264) are made on the GPU and written to --dir once; the
first pass warms the page cache and the best of --repeats passes is reported.

Also reports the read floor: all inputs read once from the page cache into pinned memory, with one
thread and with one thread per input. GB/s = bytes of inputs (experts + base) / seconds.
Writes gpu-units.json and gpu-units.md to $OUT (or .bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.checkpoints import BASE_STD, DELTA_STD, parse_count, shape_for  # noqa: E402
from benchmarks.gpu import METHODS  # noqa: E402  (the same parameters as the kernel timings)
from flows.plan import make_plan  # noqa: E402
from flows.recipe import parse_recipe  # noqa: E402
from flows.unit import UnitJob, run_unit  # noqa: E402
from storage import open_checkpoint  # noqa: E402


def make_checkpoints(root: Path, params: int, experts: int, hidden: int, device: str) -> list[Path]:
    """root/base, root/expert-<i>: a base and experts that differ by small deltas, made on `device`."""
    shape = shape_for(params, hidden=hidden)
    dirs = [root / "base", *[root / f"expert-{i}" for i in range(experts)]]
    done = root / "DONE.json"
    meta = {"shape": shape.describe(), "experts": experts}
    if done.exists() and json.loads(done.read_text()) == meta:
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    gen = torch.Generator(device=device).manual_seed(0)
    base = {n: (torch.randn(s, generator=gen, device=device) * BASE_STD + (1.0 if len(s) == 1 else 0.0))
            .to(torch.bfloat16) for n, s in shape.tensors()}
    for i, d in enumerate(dirs):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(shape.config()))
        tensors = base if i == 0 else {
            n: (b.float() + torch.randn(b.shape, generator=gen, device=device) * DELTA_STD * (0.6 + 0.2 * i))
            .to(torch.bfloat16) for n, b in base.items()}
        save_file({n: t.cpu() for n, t in tensors.items()}, str(d / "model.safetensors"))
    done.write_text(json.dumps(meta))
    print(f"wrote {len(dirs)} checkpoints of {shape.describe()} to {root}", flush=True)
    return dirs


def read_floor(dirs: list[Path], threads: int, pinned: bool) -> float:
    """Seconds to read every tensor of every input once (into pinned memory for a GPU)."""
    ckpts = [open_checkpoint(str(d)) for d in dirs]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        def read(ck):
            for name, info in ck.tensors.items():
                ck.read_tensor(name, out=torch.empty(info.shape, dtype=info.torch_dtype, pin_memory=pinned))
        list(pool.map(read, ckpts))
    return time.perf_counter() - t0


def merge_all(dirs: list[Path], method: str, staging: Path, workers: int, device: str) -> float:
    """Seconds to run every unit of the plan on `device`, --workers at a time."""
    recipe = yaml.safe_dump({
        "merge_method": method, "base_model": str(dirs[0]), "models": [{"model": str(d)} for d in dirs[1:]],
        "parameters": METHODS[method], "dtype": "bfloat16", "device": device, "output": str(staging / "out"),
    })
    plan = make_plan(parse_recipe(recipe, source=f"{method}.yaml"))
    jobs = [UnitJob.from_plan(plan, u, str(staging)) for u in plan.units]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run_unit, jobs))
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="1B", help="parameters per model (default 1B)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--workers", type=int, default=4, help="units at once, as the CLI's --workers (default 4)")
    p.add_argument("--budget-mb", type=float, default=16384,
                   help="MERGELINE_MEMORY_BUDGET_MB (default 16384: every tensor merged whole)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per method after a warm-up; best reported")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--hidden", type=int, default=4096, help="model width (default 4096, Llama-7B's)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to check this script")
    p.add_argument("--dir", type=Path, default=Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
                   / "mergeline-gpu-units", help="where the checkpoints are written (kept for the next run)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device visible to torch", torch.__version__, "- nothing to measure", file=sys.stderr)
        return 2
    os.environ["MERGELINE_MEMORY_BUDGET_MB"] = str(args.budget_mb)
    dirs = make_checkpoints(args.dir, parse_count(args.params), args.experts, args.hidden, args.device)
    in_bytes = sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors"))
    floor = {t: min(read_floor(dirs, t, cuda) for _ in range(2)) for t in (1, len(dirs))}
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"{device_name}: {in_bytes / 1e9:.1f} GB of inputs; read floor "
          + ", ".join(f"{t} thread(s) {s:.2f} s ({in_bytes / s / 1e9:.1f} GB/s)" for t, s in floor.items()), flush=True)
    results = {}
    for method in [m for m in args.methods.split(",") if m]:
        times = []
        for _ in range(args.repeats + 1):
            with tempfile.TemporaryDirectory(dir=args.dir) as staging:
                times.append(merge_all(dirs, method, Path(staging), args.workers, args.device))
        best = min(times[1:])
        results[method] = {"seconds": best, "gb_s": in_bytes / best / 1e9, "all_seconds": times}
        print(f"  {method:16s} {best:6.2f} s {in_bytes / best / 1e9:6.1f} GB/s  (passes: "
              + ", ".join(f"{t:.2f}" for t in times) + ")", flush=True)
    info = {"device": device_name, "torch": torch.__version__, "input_bytes": in_bytes,
            "workers": args.workers, "budget_mb": args.budget_mb, "read_floor_s": floor,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    md = [f"{info['device']}, torch {info['torch']}, {info['date']}: {in_bytes / 1e9:.1f} GB of bf16 inputs, "
          f"{args.workers} units at once, budget {args.budget_mb:g} MB. Read floor (page cache to {'pinned' if cuda else 'ordinary'} memory): "
          + ", ".join(f"{t} thread(s) {s:.2f} s" for t, s in floor.items()) + ".", "",
          "| method | s | GB/s |", "|---|--:|--:|"]
    md += [f"| {m} | {r['seconds']:.2f} | {r['gb_s']:.1f} |" for m, r in results.items()]
    out_dir = Path(os.environ.get("OUT") or ROOT / ".bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu-units.json").write_text(json.dumps({"info": info, "results": results}, indent=2))
    (out_dir / "gpu-units.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
