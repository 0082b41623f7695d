"""The CPU merge's element loops, compiled with numba: one pass over a chunk where torch's CPU
kernels make a dozen, each through memory, and where numpy had to stand in for the unsigned and
boolean steps torch's CPU kernels do slowly.

Each function does, element by element, exactly the float32 operations of the torch code it
stands in for, in the same order (no fused multiply-adds, no reassociation: numba compiles without
fastmath), so a CPU merge and an accelerator merge give the same bits; tests check it. The one
exception is DARE's L1 norms, float64 sums whose order torch does not fix either (it depends on
the device and the CPU's vector width); the rescale is their ratio rounded to float32, so the
two paths differ only where that ratio lies within a float64 rounding of a float32 boundary.
Compiled once per machine and cached beside this file (numba's `cache=True`); `nogil`, so units merging in
threads use every core. Imported on first use: importing numba costs about 0.2 s.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_JIT = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)
_ZERO, _ONE = np.float32(0.0), np.float32(1.0)
_M32 = np.uint64(0xFFFFFFFF)


@intrinsic
def _float_of_bits(typingctx, bits):
    """The float32 whose bit pattern is `bits` (uint32): a register move, no memory."""
    return types.float32(types.uint32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


@intrinsic
def _bits_of_float(typingctx, value):
    """The bit pattern (uint32) of a float32."""
    return types.uint32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


def load(a, j):
    """a[j] as float32, where a bfloat16 array comes as its uint16 bit patterns (numba has no
    bfloat16): exactly torch's upcast, so the CPU reads checkpoints' tensors as they are."""


@overload(load, inline="always")
def _load(a, j):
    if a.dtype == types.uint16:
        return lambda a, j: _float_of_bits(np.uint32(np.uint32(a[j]) << np.uint32(16)))
    return lambda a, j: np.float32(a[j])


# Elements per block of elect_mean: its rows of deltas and per-block sums stay in L1, and each of
# its loops is a plain pass without stores on a branch, which LLVM vectorises.
_BLOCK = 2048


@njit(**_JIT)
def _draw(position, k1, k2):
    """merge_ops.dropout's lowbias32 draw for a position below 2**32."""
    x = ((np.uint64(position) + k2) & _M32) ^ k1
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> np.uint64(16))


@njit(**_JIT)
def elect_mean(experts, position, base, below, drops, keys, thresholds, scales, weights, normalize, lam, out):
    """TIES and DARE-TIES on one chunk, the elements from `position` on, written to out (float32).

    experts: a tuple of the experts' chunks (see `load`); base: the base's chunk, float32.
    Each delta is trimmed where |d| <= below[i] (torch.hardshrink; -inf trims nothing); where
    drops, it is DARE-dropped (kept where the draw with keys[i] is below thresholds[i]) and times
    scales[i]. Then the sign of the weighted sum is elected, and the weighted mean of the agreeing
    deltas (their sum, without normalize) times lam is added to the base: the steps of
    methods._disjoint_mean_, element by element."""
    n_experts, m = len(experts), out.size
    rows = np.empty((n_experts, _BLOCK), np.float32)
    total, num, den = np.empty(_BLOCK, np.float32), np.empty(_BLOCK, np.float32), np.empty(_BLOCK, np.float32)
    for j0 in range(0, m, _BLOCK):
        k = min(_BLOCK, m - j0)
        b, o = base[j0:j0 + k], out[j0:j0 + k]  # slices: indices from 0 vectorise, offset ones do not
        for i in range(n_experts):
            e, row, lim, w = experts[i][j0:j0 + k], rows[i], below[i], weights[i]
            for j in range(k):
                d = load(e, j) - b[j]
                row[j] = _ZERO if (d >= -lim) & (d <= lim) else d
            if drops:
                k1, k2, threshold, scale = keys[i, 0], keys[i, 1], thresholds[i], scales[i]
                for j in range(k):
                    keep = _ONE if _draw(position + j0 + j, k1, k2) < threshold else _ZERO
                    row[j] = row[j] * keep * scale
            for j in range(k):
                total[j] = row[j] * w if i == 0 else total[j] + row[j] * w
        for j in range(k):  # the elected sign, kept in total
            total[j] = _ONE if total[j] > _ZERO else (-_ONE if total[j] < _ZERO else _ZERO)
        for i in range(n_experts):
            row, w = rows[i], weights[i]
            for j in range(k):
                a = row[j] * total[j]
                a = _ZERO if a < _ZERO else a  # clamp_min(0): -0.0 and NaN stay as they are, as in torch
                agrees = _ONE if a > _ZERO else _ZERO
                num[j] = a * w if i == 0 else num[j] + a * w
                den[j] = agrees * w if i == 0 else den[j] + agrees * w
        for j in range(k):
            r = num[j]
            if normalize:
                nonzero = _ONE if den[j] != _ZERO else _ZERO
                r = r / (den[j] + (-nonzero + _ONE)) * nonzero
            o[j] = r * total[j] * lam + b[j]


@njit(**_JIT)
def drop_(d, k1, k2, start, threshold, scale):
    """DARE on one expert's chunk of float32 deltas, in place (dare_linear's merge): d[j] times
    1.0 where the draw for position start + j is below threshold, else 0.0, then times scale."""
    for j in range(d.size):
        d[j] = d[j] * (_ONE if _draw(start + j, k1, k2) < threshold else _ZERO) * scale


@njit(fastmath={"reassoc"}, **_JIT)
def _sum64(a, k):
    """a[0:k] (float32) added up in float64, in the order LLVM vectorises the loop to for this
    CPU: the only reassociation in this module, as torch's own float64 sum reassociates too."""
    total = 0.0
    for j in range(k):
        total += a[j]
    return total


@njit(**_JIT)
def l1_sums(expert, base, start, drops, k1, k2, threshold):
    """DARE's L1 pre-pass over one chunk of one expert (see `load`; base: float32), the elements
    from position `start` on: (the sum of |d|, the sum of |d| over the entries the drop keeps),
    both in float64, d = expert - base; without drops, the two are the same."""
    mags, kept = np.empty(_BLOCK, np.float32), np.empty(_BLOCK, np.float32)
    before = after = 0.0
    for j0 in range(0, base.size, _BLOCK):
        k = min(_BLOCK, base.size - j0)
        e, b = expert[j0:j0 + k], base[j0:j0 + k]
        for j in range(k):
            mags[j] = abs(load(e, j) - b[j])
        block = _sum64(mags, k)
        before += block
        if drops:
            for j in range(k):
                kept[j] = mags[j] * (_ONE if _draw(start + j0 + j, k1, k2) < threshold else _ZERO)
            after += _sum64(kept, k)
        else:
            after += block
    return before, after


@njit(**_JIT)
def bracket_feed(expert, base, hi, lo_bits, width, inside, n_inside):
    """topk.Bracket's pass over the magnitudes |expert - base| of a chunk (expert: see `load`;
    base: float32): (how many are above hi, the new count of those in [lo, hi] copied to inside
    from n_inside on); the count is -1 once inside is full. Non-negative floats order like their
    bit patterns, so "lo <= v <= hi" is the unsigned test bits(v) - bits(lo) <= bits(hi) -
    bits(lo), mod 2**32: a third of the time of two float comparisons. Per block, the magnitudes
    and the count vectorise; the copy's branch is rarely taken."""
    mags = np.empty(_BLOCK, np.float32)
    bits = mags.view(np.uint32)
    above = 0
    for j0 in range(0, base.size, _BLOCK):
        k = min(_BLOCK, base.size - j0)
        e, b = expert[j0:j0 + k], base[j0:j0 + k]
        for j in range(k):
            mags[j] = abs(load(e, j) - b[j])
        for j in range(k):
            above += mags[j] > hi
        if n_inside + k > inside.size:  # it might fill up: count first (the copy's loop runs twice as fast unchecked)
            count = n_inside
            for j in range(k):
                count += np.uint32(bits[j] - lo_bits) <= width
            if count > inside.size:
                return above, -1
        for j in range(k):
            if np.uint32(bits[j] - lo_bits) <= width:
                inside[n_inside] = mags[j]
                n_inside += 1
    return above, n_inside


@njit(**_JIT)
def count_above_and_at(expert, base, hi, hi_bits):
    """bracket_feed for a bracket of one value, hi (bf16 deltas tie in bulk: on the benchmark's
    the bracket is a single magnitude holding 3% of the entries): (how many are above it, how many
    equal it), in one vectorised loop with nothing to copy."""
    above = at = 0
    for j in range(base.size):
        v = abs(load(expert, j) - base[j])
        above += v > hi
        at += _bits_of_float(v) == hi_bits
    return above, at

