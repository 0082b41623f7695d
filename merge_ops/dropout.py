"""DARE's random drop mask as a pure function of (seed, tensor name, expert, element position).

A counter-based hash instead of a stateful generator: any chunk of any tensor can be drawn on
its own, on any device, in any order, and gives the same bits as drawing the whole tensor at
once. That is what makes a distributed or resumed merge bit-identical to a one-shot one.
"""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF


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
    h = _mix32((pos & _M32) ^ k1)
    return _mix32(h ^ (pos >> 32) ^ k2)


def keep_mask(keys: tuple[int, int], start: int, stop: int, density: float, device="cpu") -> torch.Tensor:
    """True where the entry survives: P(keep) = density (to within 2**-32)."""
    return random_u32(keys, start, stop, device) < int(density * 2**32)
