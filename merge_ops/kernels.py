"""Which implementation of the integer-heavy steps (DARE's draws, TIES's bracket) a merge runs.

numpy on a CPU merge with one intra-op thread: numpy has unsigned 32-bit operations and cheap
bool outputs, where torch's CPU kernels emulate the first and write the second several times
slower. torch with more threads (numpy's steps are single-threaded, torch's parallel; on the
benchmark machine the two are equal at 2 threads) and on an accelerator. Both give the same bits.
Tests switch between them to cover both on any machine.
"""

from __future__ import annotations

import torch


def numpy_on(device: torch.device | str, threads: int | None = None) -> bool:
    """threads: the merge's intra-op threads (default: torch's current count for this thread)."""
    threads = torch.get_num_threads() if threads is None else threads
    return torch.device(device).type == "cpu" and threads == 1
