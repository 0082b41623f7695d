"""DARE's random drop mask as a pure function of (seed, tensor name, expert, element position).

A counter-based hash instead of a stateful generator: any chunk of any tensor can be drawn on
its own, on any device, in any order, and gives the same bits as drawing the whole tensor at
once. That is what makes a distributed or resumed merge bit-identical to a one-shot one.

The draw for position j of a stream with keys (k1, k2) is one round of lowbias32:

    lowbias32((((j mod 2**32) + k2) mod 2**32) ^ k1 ^ lowbias32(j >> 32))

and lowbias32(0) == 0, so below 2**32 positions (every tensor there is) the inner term vanishes.

Three implementations of the same function, all giving exactly the bits of the formula:
`random_u32` (uint32 values held in int64, any position, any device); the CPU merge's compiled
loop (merge_ops.fused.drop_, positions below 2**32, 0.4 ns per draw on the benchmark machine);
and `DropMask` for torch's path (an accelerator), on reused int32 buffers with wrap-around
arithmetic and emulated logical shifts.
"""

from __future__ import annotations

import hashlib

import torch

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
    """Writes keep_mask of one stream as 1.0 / 0.0 into a float32 buffer (what torch's kernels
    multiply by). The caller passes the work buffers, so a merge kernel draws every chunk without
    allocating. Falls back to random_u32 for positions at or past 2**32."""

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
                  ramp: torch.Tensor | None = None) -> torch.Tensor:
        """out[j] = 1.0 where entry start + j survives, else 0.0 (out: float32); returns out.

        h, t: int32 work buffers of stop - start elements (shared by the experts of a merge);
        ramp: optionally int32 0 .. stop - start - 1, kept by the caller (cheaper than an arange).
        """
        if self.drops_nothing:
            return out.fill_(1.0)
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
