"""safetensors headers: parse strictly, build for the writer.

safetensors' own loader needs the whole file (or an mmap), which S3 cannot give, so reading a
header is ours: 8 bytes of little-endian length, then that many bytes of JSON mapping each
tensor name to dtype, shape and data_offsets (relative to the end of the header).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from storage.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1000 * 1000

# safetensors dtype code -> torch dtype, for every code torch can represent byte-for-byte.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
    "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
    "C64": torch.complex64, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
for _code, _attr in (("F8_E8M0", "float8_e8m0fnu"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2FNUZ", "float8_e5m2fnuz")):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def itemsize(code: str) -> int:
    return DTYPES[code].itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: [start, end) are absolute offsets within `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """The header length from the file's first 8 bytes, refused if absurd for this file."""
    if file_size < 8 or len(prefix) != 8:
        raise CheckpointError(f"{where}: {file_size} bytes is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise CheckpointError(f"{where}: file is {file_size} bytes, shorter than its {n}-byte header says")
    return n


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise CheckpointError(f"duplicate key {k!r}")
        d[k] = v
    return d


def parse_header(raw: bytes, *, file: str, file_size: int, where: str) -> tuple[list[TensorInfo], dict[str, str]]:
    """Tensors (sorted by offset) and metadata; refuses anything safetensors itself would not write."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: header has a {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    base = 8 + len(raw)
    tensors = []
    for name, entry in header.items():
        tensors.append(_tensor(name, entry, file, base, file_size, where))
    tensors.sort(key=lambda t: (t.start, t.end))
    for prev, cur in zip(tensors, tensors[1:], strict=False):
        if cur.start < prev.end:
            raise CheckpointError(f"{where}: tensors {prev.name!r} and {cur.name!r} overlap")
    return tensors, metadata


def _tensor(name: str, entry, file: str, base: int, file_size: int, where: str) -> TensorInfo:
    what = f"{where}: tensor {name!r}"
    if not name or not isinstance(entry, dict):
        raise CheckpointError(f"{what}: malformed entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise CheckpointError(f"{what}: dtype {dtype!r} is not one torch can read")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{what}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise CheckpointError(f"{what}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
    start, end = base + offsets[0], base + offsets[1]
    if end > file_size:
        raise CheckpointError(f"{what}: data_offsets {offsets!r} lie outside the file ({file_size} bytes)")
    if end - start != math.prod(shape) * itemsize(dtype):
        raise CheckpointError(f"{what}: {end - start} bytes do not hold shape {shape} of {dtype}")
    return TensorInfo(name, dtype, tuple(shape), file, start, end)


def build_header(specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """The 8-byte length + JSON header (space-padded to 8 bytes, as safetensors does) and each tensor's size."""
    header: dict = {"__metadata__": dict(metadata or {})}
    sizes, offset = [], 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        sizes.append(size)
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes
