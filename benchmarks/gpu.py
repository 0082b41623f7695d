"""mergeline's merge kernels on a CUDA GPU: GB/s merged, per method.

    python benchmarks/gpu.py [--params 1B] [--experts 4] [--repeats 3]

Needs only torch with CUDA, numpy and this repository (merge_ops does no I/O): no Prefect, no files,
no network. Synthetic bf16 tensors in Llama-7B-like shapes (a base and experts that differ by small
deltas) are made on the GPU; every method merges all of them with merge_ops.merge_tensors, the same
call the flow's GPU path makes per tensor. Two timings per method:

- on-GPU: inputs already in GPU memory (the kernels alone);
- from host: inputs in (pageable) CPU memory, copied to the GPU per tensor and the result copied
  back, as flows/unit.py does when a recipe says `device: cuda`;
- streamed: every tensor merged as flows/unit.py merges one larger than its memory budget
  (merge_ops.merge_stream over RowStreams of the host tensors, --window-mib per input window, the
  next window copied while one merges, merged rows copied back window by window).

GB/s = bytes of input tensors (experts + base, bf16) / seconds. "GPU MiB held" is the peak of GPU
memory allocated beyond the resident on-GPU inputs: a whole tensor's inputs, output and scratch
from host, a few windows streamed. Writes gpu-results.json and
gpu-results.md to $OUT (or .bench/) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.checkpoints import parse_count  # noqa: E402
from merge_ops import RowStream, merge_stream, merge_tensors, window_rows  # noqa: E402

METHODS = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.2},
    "dare_ties": {"density": 0.1, "rescale": "l1"},
    "dare_linear": {"density": 0.1, "rescale": "l1"},
}


def shapes(params: int) -> list[tuple[str, tuple[int, int]]]:
    """Llama-7B-like matrices (hidden 4096, MLP 11008) up to about `params` parameters."""
    h, i = 4096, 11008
    layer = [("q", (h, h)), ("k", (h, h)), ("v", (h, h)), ("o", (h, h)), ("gate", (i, h)), ("up", (i, h)),
             ("down", (h, i))]
    out, total, n = [("embed", (32000, h))], 32000 * h, 0
    while total < params:
        for name, s in layer:
            out.append((f"layers.{n}.{name}", s))
            total += s[0] * s[1]
        n += 1
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="1B", help="parameters per model (default 1B)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per method; the best is reported")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--window-mib", type=float, default=32, help="streamed pass: MiB per input window (default 32)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to check this script")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", torch.__version__, "- nothing to measure", file=sys.stderr)
        return 2
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
    gen = torch.Generator(device=dev).manual_seed(0)
    tensors = []
    for name, s in shapes(parse_count(args.params)):
        base = (torch.randn(s, generator=gen, device=dev) * 0.02).to(torch.bfloat16)
        experts = [(base.float() + torch.randn(s, generator=gen, device=dev) * 0.0015 * (1 + 0.3 * e))
                   .to(torch.bfloat16) for e in range(args.experts)]
        tensors.append((name, base, experts))
    n_params = sum(b.numel() for _, b, _ in tensors)
    in_bytes = sum((1 + len(e)) * b.numel() * b.element_size() for _, b, e in tensors)
    props = torch.cuda.get_device_properties(dev) if cuda else None
    info = {"device": props.name if cuda else "cpu", "memory_gib": props.total_memory / 2**30 if cuda else 0.0,
            "torch": torch.__version__,
            "cuda": torch.version.cuda, "params": n_params, "experts": args.experts, "input_bytes": in_bytes,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"{info['device']}: {n_params / 1e9:.2f}B parameters x {args.experts + 1} inputs = {in_bytes / 1e9:.1f} GB",
          flush=True)

    def run_gpu(method: str, kw: dict) -> None:
        for name, b, e in tensors:
            merge_tensors(method, e, b, name=name, out_dtype=torch.bfloat16, **kw)

    host = [(name, b.cpu(), [x.cpu() for x in e]) for name, b, e in tensors]

    def run_host(method: str, kw: dict) -> None:  # what flows/unit.py does per tensor with device: cuda
        for name, b, e in host:
            moved = [x.to(dev, non_blocking=True) for x in e]
            merge_tensors(method, moved, b.to(dev), name=name, out_dtype=torch.bfloat16, **kw).cpu()

    window_bytes = int(args.window_mib * 2**20)
    copier = ThreadPoolExecutor(max_workers=args.experts + 1)

    def run_streamed(method: str, kw: dict) -> None:  # what flows/unit.py does with a tensor over the budget
        for name, b, e in host:
            rows = window_rows(b.shape, b.element_size(), window_bytes)
            b_s, *e_s = [RowStream(t.shape, t.dtype, lambda r0, r1, t=t: t[r0:r1], rows, f"{name} input {i}", dev,
                                   copier) for i, t in enumerate([b, *e])]
            merge_stream(method, e_s, b_s, write=lambda block: block.cpu(), name=name, out_dtype=torch.bfloat16,
                         **kw)

    results = {}
    for method in [m for m in args.methods.split(",") if m]:
        kw = METHODS[method]
        row = {}
        for label, fn in (("gpu", run_gpu), ("host", run_host), ("streamed", run_streamed)):
            merge_tensors(method, tensors[-1][2], tensors[-1][1], name="warmup", **kw)  # compile/caches
            sync()
            best = float("inf")
            resident = torch.cuda.memory_allocated() if cuda else 0  # the on-GPU inputs
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(method, kw)
                sync()
                best = min(best, time.perf_counter() - t0)
            row[label] = {"seconds": best, "gb_s": in_bytes / best / 1e9,
                          "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                          "held_gpu_mib": (torch.cuda.max_memory_allocated() - resident) / 2**20 if cuda else 0.0}
        results[method] = row
        print(f"  {method:16s} on-GPU {row['gpu']['seconds']:6.2f} s {row['gpu']['gb_s']:7.1f} GB/s | "
              f"from host {row['host']['seconds']:6.2f} s {row['host']['gb_s']:6.1f} GB/s | "
              f"streamed {row['streamed']['seconds']:6.2f} s {row['streamed']['gb_s']:6.1f} GB/s", flush=True)

    md = [f"GPU: {info['device']} ({info['memory_gib']:.0f} GiB), torch {info['torch']} (CUDA {info['cuda']}), "
          f"{info['date']}. {n_params / 1e9:.2f}B parameters, a base and {args.experts} experts in bf16 "
          f"({in_bytes / 1e9:.1f} GB of inputs); best of {args.repeats}; streamed windows of {args.window_mib:g} MiB "
          f"per input. Command: `bash benchmarks/gpu.sh`.", "",
          "| method | on-GPU s | on-GPU GB/s | from host s | from host GB/s | streamed s | streamed GB/s "
          "| GPU MiB held, from host | GPU MiB held, streamed |",
          "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for method, row in results.items():
        md.append(f"| {method} | {row['gpu']['seconds']:.2f} | {row['gpu']['gb_s']:.1f} | {row['host']['seconds']:.2f} "
                  f"| {row['host']['gb_s']:.1f} | {row['streamed']['seconds']:.2f} | {row['streamed']['gb_s']:.1f} "
                  f"| {row['host']['held_gpu_mib']:.0f} | {row['streamed']['held_gpu_mib']:.0f} |")
    text = "\n".join(md) + "\n"
    out_dir = Path(os.environ.get("OUT") or ROOT / ".bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu-results.json").write_text(json.dumps({"info": info, "results": results}, indent=2))
    (out_dir / "gpu-results.md").write_text(text)
    print()
    print(text)
    print(f"written to {out_dir}/gpu-results.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
