"""A tensor too large to hold, read one window of rows at a time.

A merge reads its inputs in passes, each slicing them in order ([start:stop], chunk after chunk).
A `RowStream` serves those slices from one window of rows and reads the next window when a slice
runs past the current one, so the merge of a tensor with a billion elements holds a window per
input, not the tensor. Each pass reads the inputs again: TIES three times (two counting passes for
its thresholds, then the merge), DARE with the L1 rescale twice, the others once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait

import torch


class RowStream:
    """Rows of a stored tensor, flattened to 1-D, read through `read_rows(r0, r1)` (which returns
    rows [r0, r1) in `dtype`) at most `window_rows` at a time. `label` names the input in errors.
    With `read_ahead` (an executor), the window after the current one is read while it is used:
    two windows held instead of one.

    With `fills`, `read_rows(r0, r1, out)` fills `out` (those rows, flattened, in `dtype`, on the
    CPU) instead, and the stream reads every window into the same one or two buffers: windows
    then never churn the allocator, whose freed blocks fragment into memory it keeps. A slice is
    then valid until the next slice of the same stream is taken (the merge kernels use each
    slice at once)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, read_rows: Callable[..., torch.Tensor],
                 window_rows: int, label: str, device: torch.device | str = "cpu", read_ahead: Executor | None = None,
                 fills: bool = False):
        if not shape or window_rows < 1:
            raise ValueError(f"{label}: a stream needs a tensor with rows and a window of at least one row")
        self.shape, self.dtype, self.label = tuple(shape), dtype, label
        self.device = torch.device(device)
        self.row = math.prod(self.shape[1:])  # elements per row
        self.window_rows = min(window_rows, self.shape[0])
        self._read_rows = read_rows
        self._read_ahead = read_ahead
        # buffers a window is read into, when read_rows fills them: one per window held
        self._buffers: list[torch.Tensor | None] | None = [None] * (1 + (read_ahead is not None)) if fills else None
        self._next: tuple[int, Future, int] | None = None  # (first row, its window being read, its buffer)
        self._window: torch.Tensor | None = None
        self._buffer = 0  # the buffer holding the current window
        self._start = self._stop = 0  # element range the window holds

    def numel(self) -> int:
        return self.shape[0] * self.row

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __getitem__(self, key: slice) -> torch.Tensor:
        start, stop, step = key.indices(self.numel())
        if step != 1:
            raise ValueError(f"{self.label}: a stream is sliced with step 1 only")
        pieces = []
        while start < stop:
            if pieces and self._buffers is not None:
                pieces[-1] = pieces[-1].clone()  # its buffer is about to be read into
            window = self._window_at(start)
            end = min(stop, self._stop)
            pieces.append(window[start - self._start:end - self._start])
            start = end
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _window_at(self, element: int) -> torch.Tensor:
        if not self._start <= element < self._stop:
            self._window = None  # let it go before reading the next
            r0 = element // self.row
            ahead, self._next = self._next, None
            if ahead and ahead[0] == r0:
                window, self._buffer = ahead[1].result(), ahead[2]
            else:
                if ahead:
                    wait([ahead[1]])  # unused, but its buffer may be the one read into next
                window = self._read(r0, self._buffer)
            r1 = r0 + window.numel() // self.row
            if not all_finite(window):
                raise ValueError(f"{self.label} contains NaN or Inf values (rows {r0}..{r1})")
            if self._read_ahead is not None and r1 < self.shape[0]:  # not past the end: a new pass starts at 0
                other = 1 - self._buffer if self._buffers is not None else 0
                self._next = (r1, self._read_ahead.submit(self._read, r1, other), other)
            self._window, self._start, self._stop = window, r0 * self.row, r1 * self.row
        return self._window

    def _read(self, r0: int, buffer: int) -> torch.Tensor:
        r1 = min(self.shape[0], r0 + self.window_rows)
        n = (r1 - r0) * self.row
        if self._buffers is None:
            window = self._read_rows(r0, r1)
        else:
            if self._buffers[buffer] is None:
                self._buffers[buffer] = torch.empty(self.window_rows * self.row, dtype=self.dtype)
            window = self._read_rows(r0, r1, self._buffers[buffer][:n])
        window = window.reshape(-1).to(self.device)
        if window.dtype != self.dtype or window.numel() != n:
            raise ValueError(f"{self.label}: rows {r0}..{r1} read as {window.dtype} x {window.numel()}, "
                             f"expected {self.dtype} x {n}")
        return window


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf: one min/max reduction (NaN propagates into both; an Inf is the min or the max),
    dozens of times faster on CPU than isfinite(t).all(), which materialises a bool tensor. (A
    compiled test of the exponent bits was no faster: this first read of the inputs is bound by
    memory, and it made linear merges, which need no compiled loop, import numba.)"""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def window_rows(shape: tuple[int, ...], bytes_per_element: int, budget: int) -> int:
    """Rows per window so that the windows held at once, `bytes_per_element` in all per element
    of the tensor, take at most `budget` bytes (at least one row)."""
    return max(1, min(shape[0], budget // max(1, math.prod(shape[1:]) * bytes_per_element)))
