"""Compile the CPU merge's numba loops ahead of time: `python -m merge_ops.warm`.

numba compiles each loop of merge_ops.fused on its first call with new argument types, about a
second each, and elect_mean once per number of experts and expert dtype; the machine code is
cached beside fused.py (or in NUMBA_CACHE_DIR). A worker image runs this once when it is built,
so that the first merge in each container, and in each Dask worker process, loads the loops
instead of compiling them. It compiles by merging small tensors through merge_tensors, so it
compiles exactly the signatures real merges use. numba keys its cache on the CPU model: an image
built on another kind of machine than its workers compiles again on first use.
"""

from __future__ import annotations

import argparse
import time

import torch

from .merge import merge_tensors
from .topk import _SMALL

# Expert dtypes with a loop of their own: bfloat16 is read as its uint16 bits, float32 as it is;
# float16 and mixed dtypes are copied to float32 (methods._arrays), so they share float32's.
DTYPES = (torch.bfloat16, torch.float32)


def warm_up(max_experts: int = 8, dtypes=DTYPES) -> dict[str, int]:
    """Merge small tensors with every method that runs a compiled loop, for 2..max_experts
    experts of each dtype; returns how many signatures each loop compiled (0: all from cache)."""
    if max_experts < 2:
        raise ValueError(f"max_experts must be at least 2, got {max_experts}")
    loops = compiled_loops()
    before = {name: _misses(loop) for name, loop in loops.items()}
    n = _SMALL + 1  # above _SMALL, TIES finds its thresholds with the bracket pass
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        base = (torch.randn(n, generator=g) * 0.02).to(dtype)
        for count in range(2, max_experts + 1):
            experts = [(base.float() + torch.randn(n, generator=g) * 0.001).to(dtype) for _ in range(count)]
            merge_tensors("ties", experts, base, name="warm", density=0.2)
            merge_tensors("dare_ties", experts, base, name="warm", density=0.5, rescale="l1")  # and the L1 pre-pass
        # one magnitude everywhere: a bracket of one value, which TIES counts (count_above_and_at)
        merge_tensors("ties", [base + 2 ** -6, base - 2 ** -6], base, name="warm", density=0.2)
    # drop_ works on float32 deltas whatever the experts' dtype: one merge compiles it
    merge_tensors("dare_linear", experts, base, name="warm", density=0.5, rescale="l1")
    return {name: _misses(loop) - before[name] for name, loop in loops.items()}


def compiled_loops() -> dict:
    """Every numba function of merge_ops.fused, by name: a loop added there is warmed and counted."""
    from numba.core.dispatcher import Dispatcher

    from . import fused

    return {name: obj for name, obj in vars(fused).items() if isinstance(obj, Dispatcher)}


def _misses(dispatcher) -> int:
    """Signatures this process compiled rather than loaded from numba's cache."""
    return sum(dispatcher.stats.cache_misses.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m merge_ops.warm", description=__doc__.split("\n\n")[0],
        epilog="Run it where the workers run (numba's cache is per CPU model), e.g. as a worker image's build step.")
    parser.add_argument("--max-experts", type=int, default=8, metavar="N",
                        help="compile the merge loop for 2..N experts (default 8); more compile on first use")
    args = parser.parse_args(argv)
    if args.max_experts < 2:
        parser.error(f"--max-experts must be at least 2, got {args.max_experts}")
    t0 = time.perf_counter()
    compiled = warm_up(args.max_experts)
    from . import fused

    where = fused.elect_mean.stats.cache_path
    print(f"merge_ops.warm: {sum(compiled.values())} loop signatures compiled, the rest loaded from the cache, "
          f"in {time.perf_counter() - t0:.1f} s ({', '.join(f'{k} {v}' for k, v in compiled.items())}); cache: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
