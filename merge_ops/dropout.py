"""DARE's random drop mask as a pure function of (seed, tensor name, expert, element position).

A counter-based hash instead of a stateful generator: any chunk of any tensor can be drawn on
its own, on any device, in any order, and gives the same bits as drawing the whole tensor at
once. That is what makes a distributed or resumed merge bit-identical to a one-shot one.

The draw for position j of a stream with keys (k1, k2) is one round of lowbias32:

    lowbias32((((j mod 2**32) + k2) mod 2**32) ^ k1 ^ lowbias32(j >> 32))

and lowbias32(0) == 0, so below 2**32 positions (every tensor there is) the inner term vanishes.

Three implementations of the same function, all giving exactly the bits of the formula:
`random_u32` (uint32 values held in int64, any position, any device), and the merge kernels'
`DropMask`, for positions below 2**32, on reused buffers: numpy's native uint32 operations for a
single-threaded CPU merge (in place, bool output: 1.3 ns per draw against 2.0 for torch's int32
lanes on the benchmark machine), otherwise torch int32 lanes with wrap-around arithmetic and
emulated logical shifts (see merge_ops.kernels). `KeptBits` keeps one stream's decisions as
packed bits for a second pass.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from . import kernels

_M32 = 0xFFFFFFFF
_I32_POSITIONS = 1 << 32  # positions the int32 path can hold (j >> 32 == 0)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons), on uint32 values held in int64: masks keep products' low 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stream_keys(seed: int, name: str, expert: int) -> tuple[int, int]:
    """Two 32-bit keys for one (seed, tensor, expert) stream."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{expert}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def random_u32(keys: tuple[int, int], start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """32-bit pseudo-random integers for element positions [start, stop) of one stream."""
    pos = torch.arange(start, stop, dtype=torch.int64, device=device)
    k1, k2 = keys
    x = (((pos & _M32) + k2) & _M32) ^ k1
    if stop > _I32_POSITIONS:  # lowbias32(0) == 0: below 2**32 the high part changes nothing
        x ^= _mix32(pos >> 32)
    return _mix32(x)


def keep_threshold(density: float) -> int:
    """An entry survives where its 32-bit draw is below this: P(keep) = density (to within 2**-32)."""
    return int(density * 2**32)


def keep_mask(keys: tuple[int, int], start: int, stop: int, density: float, device="cpu") -> torch.Tensor:
    """True where the entry survives: P(keep) = density (to within 2**-32)."""
    return random_u32(keys, start, stop, device) < keep_threshold(density)


def _i32(v: int) -> int:
    """A uint32 value as the int32 with the same bits."""
    return v - (1 << 32) if v >= 1 << 31 else v


_MUL1, _MUL2 = _i32(0x7FEB352D), _i32(0x846CA68B)
_SIGN = _i32(0x80000000)


class DropMask:
    """Writes keep_mask of one stream as 1.0 / 0.0 into a float32 buffer (what the kernels multiply by).

    The caller passes the work buffers, so a merge kernel draws every chunk without allocating.
    Falls back to random_u32 for positions at or past 2**32.
    """

    _U32 = tuple(np.uint32(v) for v in (0x7FEB352D, 0x846CA68B))

    def __init__(self, keys: tuple[int, int], density: float, device):
        self.k1 = _i32(keys[0])
        self.keys = keys
        self.threshold = keep_threshold(density)
        self.drops_nothing = self.threshold > _M32
        self.device = device

    @staticmethod
    def _mix32_(x: torch.Tensor, t: torch.Tensor) -> None:
        """lowbias32 in place on int32 lanes: products wrap mod 2**32; (x >> s) & mask is the logical shift."""
        torch.bitwise_right_shift(x, 16, out=t)
        t &= 0xFFFF
        x ^= t
        x *= _MUL1
        torch.bitwise_right_shift(x, 15, out=t)
        t &= 0x1FFFF
        x ^= t
        x *= _MUL2
        torch.bitwise_right_shift(x, 16, out=t)
        t &= 0xFFFF
        x ^= t

    def keep_into(self, start: int, stop: int, out: torch.Tensor, h: torch.Tensor, t: torch.Tensor,
                  ramp: torch.Tensor | None = None, record: KeptBits | None = None) -> torch.Tensor:
        """out[j] = 1.0 where entry start + j survives, else 0.0 (out: float32); returns out.

        h, t: int32 work buffers of stop - start elements (shared by the experts of a merge);
        ramp: optionally int32 0 .. stop - start - 1, kept by the caller (cheaper than an arange);
        record: also store the decisions there (numpy path only: see merge_ops.kernels).
        """
        if self.drops_nothing:
            return out.fill_(1.0)
        if kernels.numpy_on(out.device):
            keep = self._keep_numpy(start, stop, h, t, ramp)
            if record is not None:
                record.store(start, keep)
            np.copyto(out.numpy(), keep)
            return out
        if record is not None:
            raise ValueError("DropMask: decisions are recorded on the numpy path only")
        if stop > _I32_POSITIONS:
            return torch.lt(random_u32(self.keys, start, stop, self.device), self.threshold, out=out)
        offset = _i32((start + self.keys[1]) & _M32)  # (j + k2) mod 2**32 for j = start
        if ramp is not None:
            torch.add(ramp, offset, out=h)            # wraps mod 2**32 like the formula
        else:
            torch.arange(stop - start, dtype=torch.int32, out=h)
            h += offset
        h ^= self.k1
        self._mix32_(h, t)
        h ^= _SIGN            # unsigned order as signed order: flip the top bit on both sides
        return torch.lt(h, self.threshold - (1 << 31), out=out)

    def _keep_numpy(self, start: int, stop: int, h: torch.Tensor, t: torch.Tensor,
                    ramp: torch.Tensor | None) -> np.ndarray:
        """The decisions as a numpy bool array, a view of t's memory (valid until t is reused)."""
        m = stop - start
        keep = t.numpy().view(np.bool_)[:m]
        if stop > _I32_POSITIONS:
            return np.less(random_u32(self.keys, start, stop).numpy(), self.threshold, out=keep)
        x, s = h.numpy().view(np.uint32), t.numpy().view(np.uint32)
        offset = np.uint32((start + self.keys[1]) & _M32)
        ramp = ramp.numpy().view(np.uint32) if ramp is not None else np.arange(m, dtype=np.uint32)
        np.add(ramp, offset, out=x)  # wraps mod 2**32 like the formula
        np.bitwise_xor(x, np.uint32(self.keys[0]), out=x)
        mul1, mul2 = self._U32
        for shift, mul in ((16, mul1), (15, mul2), (16, None)):  # lowbias32, uint32 wrap-around
            np.bitwise_xor(x, np.right_shift(x, shift, out=s), out=x)
            if mul is not None:
                np.multiply(x, mul, out=x)
        return np.less(x, np.uint32(self.threshold), out=keep)


class KeptBits:
    """One stream's keep decisions over a whole tensor, one bit per element (n / 8 bytes): drawn
    once in a pre-pass (DARE's L1 rescale), read back by the merge pass instead of drawn again."""

    def __init__(self, n: int):
        self.bits = np.zeros((n + 7) // 8, dtype=np.uint8)

    def store(self, start: int, keep: np.ndarray) -> None:
        if start % 8:
            raise ValueError(f"KeptBits.store: start {start} is not a multiple of 8")
        self.bits[start // 8:start // 8 + (keep.size + 7) // 8] = np.packbits(keep)

    def load_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """out[j] = 1.0 where entry start + j survives, else 0.0 (out: float32 on CPU); returns out."""
        first = start // 8
        bits = np.unpackbits(self.bits[first:(stop + 7) // 8])
        np.copyto(out.numpy(), bits[start - 8 * first:stop - 8 * first])
        return out
