"""Which implementation of a merge's element loops runs: merge_ops.fused (numba) on the CPU,
torch's own kernels on an accelerator. Both give the same bits; tests switch between them to
cover both on any machine.

Measured on the benchmark machine (one thread, bf16, 4 experts): TIES's merge pass 2.0 -> 0.3 ns
per element and expert, its threshold pass 1.7 -> 0.7, DARE's drawn drop 1.3 (numpy) -> 0.4, DARE's
L1 pre-pass 1.3 (torch's sums around the compiled drop) -> 0.7.
"""

from __future__ import annotations

import torch


def fused_on(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu"


def fused():
    """merge_ops.fused, imported on first use (numba's import and cache load cost 0.2-0.4 s, which
    commands that never merge on the CPU should not pay)."""
    from . import fused as module

    return module
