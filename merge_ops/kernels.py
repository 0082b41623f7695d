"""Which implementation of the integer-heavy steps (DARE's draws, TIES's bracket) a device runs.

On CPU, numpy: it has unsigned 32-bit operations and cheap bool outputs, where torch's CPU
kernels emulate the first and write the second several times slower. On an accelerator, torch.
Both give the same bits. Tests switch the CPU to the torch path to cover it without a GPU.
"""

from __future__ import annotations

import torch


def numpy_on(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu"
