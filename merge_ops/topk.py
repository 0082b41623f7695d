"""Exact k-th largest value without sorting the tensor.

TIES keeps every entry whose magnitude is at least the k-th largest. mergekit finds it with a
full argsort (O(n log n), several n-sized index buffers). Here a small random sample brackets
the answer, one streamed pass counts what lies above the bracket and collects the few entries
inside it, and an exact selection runs only on those. If the bracket misses (adversarial data), it
says so, and TIES selects again with `RadixSelect`, so the answer is always exact.

`Bracket` is the streamed form: the values never need to exist as one tensor, so TIES computes
each chunk's magnitudes, feeds them, and lets them go. `RadixSelect` needs two passes but only
65,536 counters: TIES takes it where a bracket missed, and for tensors too large to hold, whose
bracket's candidates would grow with them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import kernels

_SAMPLE = 1 << 16
_SMALL = 1 << 18  # below this, quickselect on the whole tensor is already cheap


@functools.lru_cache(maxsize=32)
def sample_positions(n: int, k: int) -> torch.Tensor:
    """The positions (int64, CPU, ascending) whose values bracket the k-th largest of n: a fixed
    function of (n, k), so the answer never depends on the run. Ascending, so gathering them
    walks memory forwards. Kept for the next tensor of the same shape (every layer has one): the
    draw and its sort took 1.3 ms a tensor. Callers must not write to it."""
    gen = torch.Generator(device="cpu").manual_seed(n * 31 + k)
    return torch.randint(n, (_SAMPLE,), generator=gen).sort().values


class Bracket:
    """The k-th largest of n values seen chunk by chunk, in one pass, exactly (or None if the
    sampled bracket missed it: then select on the whole tensor)."""

    def __init__(self, n: int, k: int, sample: torch.Tensor):
        """sample: the values at sample_positions(n, k), in any order."""
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        self.n, self.k = n, k
        s = sample.numel()
        pos = k / n * s
        margin = 4.0 * math.sqrt(s * (k / n) * (1 - k / n)) + 32
        # the i-th largest of the sample (0-based) is its (s - i)-th smallest
        self.lo, self.hi = _kth_smallest_two(sample, s - min(s - 1, int(pos + margin)), s - max(0, int(pos - margin)))
        # Non-negative floats order like their bit patterns read as integers, so "lo <= v <= hi"
        # is one integer range test. On the fused path (unsigned): bits(v) - bits(lo) <= width,
        # mod 2**32. On torch's (no unsigned ops): |bits(v) - mid| <= half, with lo widened by
        # one pattern where needed to make the width even.
        lo_bits, hi_bits = (int(torch.tensor(v, dtype=torch.float32).view(torch.int32)) for v in (self.lo, self.hi))
        self._lo_bits, self._width = np.uint32(lo_bits), np.uint32(hi_bits - lo_bits)
        lo_bits -= (hi_bits - lo_bits) % 2
        self._mid, self._half = (lo_bits + hi_bits) // 2, (hi_bits - lo_bits) // 2
        self._above = 0
        # Values inside the bracket, copied into one buffer of at most max_inside(n) values:
        # short-lived selections freed at once, never small survivors between them, so the
        # allocator can reuse (and return) the space instead of fragmenting it. Where more fall
        # inside (magnitudes that tie in bulk, such as the zeros of a tensor an expert never
        # changed), the bracket gives up and says it missed.
        self._inside: torch.Tensor | None = None
        self._n_inside = 0
        self._max_inside = max_inside(n)
        self._overflowed = False
        self._n_at = 0  # values equal to a one-value bracket, counted instead of collected (fused path)
        self._bufs: tuple[torch.Tensor, torch.Tensor] | None = None  # torch's path

    def feed(self, chunk: torch.Tensor) -> None:
        """The next chunk of values (non-negative float32, at most 2**24 of them)."""
        if self._overflowed:
            return
        if kernels.fused_on(chunk.device):  # the values as magnitudes against a base of zeros
            return self.feed_deltas(chunk.numpy(), np.zeros(chunk.numel(), dtype=np.float32))
        m = chunk.numel()
        if self._bufs is None or self._bufs[0].numel() < m:
            dev = chunk.device
            self._bufs = (torch.empty(m, device=dev), torch.empty(m, dtype=torch.int32, device=dev))
        f, dist = (buf[:m] for buf in self._bufs)
        # a count as a float sum of 0/1 (exact below 2**24): comparisons into bool cost more
        self._above += int(torch.gt(chunk, self.hi, out=f).sum())
        torch.sub(chunk.view(torch.int32), self._mid, out=dist).abs_()
        inside = torch.le(dist, self._half, out=dist).nonzero().squeeze(1)
        self._append(chunk.index_select(0, inside))

    def feed_deltas(self, expert: np.ndarray, base: np.ndarray) -> None:
        """The next chunk as an expert's values and the base's (CPU; expert as merge_ops.fused.load
        reads it, base float32): the magnitudes |expert - base| are made, counted and collected in
        compiled loops, straight into the buffer. A bracket of one value only counts it."""
        if self._overflowed:
            return
        fused, hi = kernels.fused(), np.float32(self.hi)
        if self._width == 0:
            above, at = fused.count_above_and_at(expert, base, hi, self._lo_bits)
            self._above, self._n_at = self._above + above, self._n_at + at
            return
        self._reserve(torch.device("cpu"))
        above, self._n_inside = fused.bracket_feed(expert, base, hi, self._lo_bits, self._width,
                                                   self._inside.numpy(), self._n_inside)
        self._above += above
        if self._n_inside < 0:
            self._give_up()

    def _append(self, selected: torch.Tensor) -> None:
        end = self._n_inside + selected.numel()
        if end > self._max_inside:
            return self._give_up()
        self._reserve(selected.device)
        self._inside[self._n_inside:end] = selected
        self._n_inside = end

    def _reserve(self, device) -> None:
        if self._inside is None:  # on the CPU, pages are committed as they are written: only what is used counts
            self._inside = torch.empty(self._max_inside, device=device)

    def _give_up(self) -> None:
        self._inside, self._n_inside, self._bufs, self._overflowed = None, 0, None, True

    def result(self) -> torch.Tensor | None:
        if self._overflowed:
            return None
        above = self._above
        if self._n_at:
            return torch.tensor(self.hi) if above < self.k <= above + self._n_at else None
        inside = self._inside[:self._n_inside] if self._inside is not None else torch.empty(0)
        self._inside, self._n_inside, self._bufs = None, 0, None
        if above < self.k <= above + inside.numel():
            return _kth_largest_select(inside, self.k - above)
        return None


class RadixSelect:
    """The k-th largest of non-negative float32 values seen chunk by chunk, exactly, in two passes
    over them that hold 65536 counters, never the values. Non-negative floats order like their bit
    patterns: pass 1 counts the high 16 bits to find the k-th's high half, pass 2 counts the low 16
    bits of the values that share it. For values too many to collect (a streamed tensor's
    magnitudes), and when a Bracket misses."""

    COUNTERS_BYTES = (1 << 16) * 8 * 2  # the counters, and one chunk's counts being added to them

    def __init__(self, k: int):
        self.k = k
        self._counts: torch.Tensor | None = None
        self._high: int | None = None  # the k-th's high half, once pass 1 is done
        self._rank = k                  # the k-th's rank among the values pass 2 counts
        self._result: float | None = None

    def feed(self, chunk: torch.Tensor) -> None:
        """The next chunk of values (non-negative float32)."""
        bits = chunk.view(torch.int32)  # non-negative: the sign bit is clear, shifts are logical
        if self._counts is None:
            self._counts = torch.zeros(1 << 16, dtype=torch.int64, device=chunk.device)
        keys = bits >> 16 if self._high is None else bits[(bits >> 16) == self._high] & 0xFFFF
        self._counts.add_(torch.bincount(keys, minlength=1 << 16))

    def end_pass(self) -> None:
        counts = self._counts.cpu().numpy() if self._counts is not None else np.zeros(1 << 16, dtype=np.int64)
        at_or_above = np.cumsum(counts[::-1])[::-1]
        if not 1 <= self._rank <= at_or_above[0]:
            raise ValueError(f"k must be in [1, {int(at_or_above[0])}], got {self.k}")
        b = int(np.flatnonzero(at_or_above >= self._rank)[-1])  # the bin holding the rank-th largest
        if self._high is None:
            self._high, self._rank = b, self._rank - int(at_or_above[b] - counts[b])
            self._counts = None
        else:
            self._result = float(np.array([(self._high << 16) | b], dtype=np.uint32).view(np.float32)[0])

    def result(self) -> float:
        if self._result is None:
            raise RuntimeError("RadixSelect.result before its two passes ended")
        return self._result


def _kth_largest_select(values: torch.Tensor, k: int) -> torch.Tensor:
    return _kth_smallest(values, values.numel() - k + 1)


def _kth_smallest(values: torch.Tensor, j: int) -> torch.Tensor:
    """The j-th smallest (1-based) of a 1-D tensor. Quickselect on CPU; a sort elsewhere, because
    CUDA's kthvalue selects with one thread block per slice, while its sort uses the whole GPU."""
    if values.device.type == "cpu":
        return torch.kthvalue(values, j).values
    return torch.sort(values).values[j - 1]


def _kth_smallest_two(values: torch.Tensor, i: int, j: int) -> tuple[float, float]:
    """The i-th and j-th smallest (1-based) of a 1-D tensor of non-negative float32. On CPU one
    np.partition for both, of their bit patterns as int32, which order like the values: 0.44 ms on
    a 65536-value sample of the benchmark's deltas, against 0.66 for the floats and 1.4 for two
    kthvalues."""
    if values.device.type == "cpu":
        parted = np.partition(values.numpy().view(np.int32), (i - 1, j - 1)).view(np.float32)
        return float(parted[i - 1]), float(parted[j - 1])
    ordered = torch.sort(values).values
    return float(ordered[i - 1]), float(ordered[j - 1])


def max_inside(n: int) -> int:
    """The most values a Bracket over n collects (float32): a sixteenth. Ordinary deltas put 1.5-5%
    of their magnitudes inside; a bracket that fills up has missed, and TIES counts instead."""
    return max(1, n // 16)


def keep_count(density: float, n: int) -> int:
    """How many entries TIES keeps: round(density * n), at least 1 and at most n."""
    return min(n, max(1, round(density * n)))
