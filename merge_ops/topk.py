"""Exact k-th largest value without sorting the tensor.

TIES keeps every entry whose magnitude is at least the k-th largest. mergekit finds it with a
full argsort (O(n log n), several n-sized index buffers). Here a small random sample brackets
the answer, two comparison passes count what lies above and inside the bracket, and an exact
selection runs only on the few candidates inside it. If the bracket misses (adversarial data),
it falls back to torch.kthvalue on the whole tensor, so the answer is always exact.
"""

from __future__ import annotations

import math

import torch

_SAMPLE = 1 << 16
_SMALL = 1 << 18  # below this, quickselect on the whole tensor is already cheap


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest element (1-based) of a 1-D float tensor, as a 0-d tensor."""
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n <= _SMALL:
        return _kth_largest_select(values, k)
    gen = torch.Generator(device="cpu").manual_seed(n * 31 + k)
    idx = torch.randint(n, (_SAMPLE,), generator=gen).to(values.device)
    sample = values[idx].sort(descending=True).values
    pos = k / n * _SAMPLE
    margin = 4.0 * math.sqrt(_SAMPLE * (k / n) * (1 - k / n)) + 32
    hi = sample[max(0, int(pos - margin))]
    lo = sample[min(_SAMPLE - 1, int(pos + margin))]
    above = int(torch.count_nonzero(values > hi))
    inside = (values >= lo) & (values <= hi)
    n_inside = int(torch.count_nonzero(inside))
    if above < k <= above + n_inside:
        return _kth_largest_select(values[inside], k - above)
    return _kth_largest_select(values, k)


def _kth_largest_select(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(values, values.numel() - k + 1).values


def keep_count(density: float, n: int) -> int:
    """How many entries TIES keeps: round(density * n), at least 1 and at most n."""
    return min(n, max(1, round(density * n)))
