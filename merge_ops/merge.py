"""merge_tensors and merge_stream: validate inputs, then run a method's kernel chunk by chunk."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .methods import DEFAULT_CHUNK, GPU_CHUNK, default_chunk  # importing methods registers them
from .registry import check_weights, get_method, resolve_params
from .stream import RowStream, all_finite

__all__ = ["DEFAULT_CHUNK", "GPU_CHUNK", "MERGEABLE_DTYPES", "default_chunk", "merge_stream", "merge_tensors",
           "output_bytes"]

# What the kernels compute on (in float32): float8 needs its scales (a per-block `*_scale_inv`
# beside each weight), so its values are not merged element by element; integers are not weights.
MERGEABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def merge_tensors(
    method: str,
    experts: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    name: str = "",
    out_dtype: torch.dtype | str | None = None,
    chunk_size: int | None | str = "auto",
    write: Callable[[torch.Tensor], None] | None = None,
    labels: Sequence[str] | None = None,
    **params,
) -> torch.Tensor | None:
    """Merge one tensor across experts with `method` (see merge_ops.METHODS).

    Computes in float32 whatever the input dtype; returns `out_dtype` if given, else the
    base's dtype (or the first expert's). `name` is the tensor's name in the checkpoint: it
    seeds the randomised methods, so the same merge gives the same bits anywhere.
    `chunk_size=None` merges in one piece, "auto" (the default) in chunks of DEFAULT_CHUNK
    elements on CPU and GPU_CHUNK on an accelerator; any chunking gives identical output.

    With `write`, the merged tensor is never made whole: its rows go to write(rows), a block of
    about 4 MiB at a time, in order, and merge_tensors returns None. Half of the page faults left
    in a linear merge of the benchmark model were its fresh output tensors.

    `labels` names the experts, then the base if one is given, in error messages (a caller
    knows them by file or URI; the default is "expert 0", ..., "the base").
    """
    if chunk_size not in ("auto", None) and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive number of elements, got {chunk_size}")
    dtype = _dtype(out_dtype)
    kernel, reference = _prepare(method, experts, base, weights, seed, name, params, labels)
    dtype, shape, n = dtype or reference.dtype, reference.shape, reference.numel()
    step = n if chunk_size is None else default_chunk(reference.device) if chunk_size == "auto" else chunk_size
    step = max(step, 1)
    if write is not None and len(shape) > 0 and n > 0:
        block = torch.empty(_write_block_elements(shape), dtype=dtype, device=reference.device)
        _write_blocks(kernel, n, step, shape, block, write)
        return None
    out = torch.empty(n, dtype=dtype, device=reference.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[start:stop] = kernel(start, stop)
    if write is None:
        return out.view(shape)
    write(out.view(shape))
    return None


_BLOCK_ELEMENTS = 1 << 21  # merge_tensors(write=): rows per block, about 4 MiB of bfloat16


def _write_block_elements(shape) -> int:
    """Elements of merge_tensors(write=)'s output block: whole rows, about _BLOCK_ELEMENTS (at
    least one row); all of a 0-d or empty tensor, which is made whole."""
    n = math.prod(shape)
    if len(shape) == 0 or n == 0:
        return n
    row = n // shape[0]
    return min(max(1, _BLOCK_ELEMENTS // row), shape[0]) * row


def output_bytes(shape, dtype: torch.dtype, device: torch.device | str) -> int:
    """Host bytes a merge's output takes at once when its rows are written as they come
    (merge_tensors(write=)): one block on the CPU; the whole tensor from an accelerator, whose
    merge comes back whole."""
    blocks = torch.device(device).type == "cpu"
    return (_write_block_elements(shape) if blocks else math.prod(shape)) * dtype.itemsize


def merge_stream(
    method: str,
    experts: Sequence[RowStream],
    base: RowStream | None = None,
    *,
    write: Callable[[torch.Tensor], None],
    weights: Sequence[float] | None = None,
    seed: int = 0,
    name: str = "",
    out_dtype: torch.dtype | str | None = None,
    labels: Sequence[str] | None = None,
    **params,
) -> None:
    """merge_tensors for inputs read a window of rows at a time (see merge_ops.stream): calls
    `write` with the merged rows, one window at a time, in order. Same bits as merge_tensors."""
    dtype = _dtype(out_dtype)
    kernel, reference = _prepare(method, experts, base, weights, seed, name, params, labels)
    block = torch.empty(reference.window_rows * reference.row, dtype=dtype or reference.dtype, device=reference.device)
    _write_blocks(kernel, reference.numel(), default_chunk(reference.device), reference.shape, block, write)


def _write_blocks(kernel, n: int, step: int, shape, block: torch.Tensor, write) -> None:
    """Run the kernel over n elements, `step` at a time, into `block` (whole rows); pass each
    full block, and the last, to write as rows."""
    filled = 0
    for start in range(0, n, step):
        merged = kernel(start, min(n, start + step))
        done = 0
        while done < merged.numel():
            take = min(merged.numel() - done, block.numel() - filled)
            block[filled:filled + take] = merged[done:done + take]
            filled, done = filled + take, done + take
            if filled == block.numel() or start + done == n:
                write(block[:filled].view(-1, *shape[1:]))
                filled = 0


def _prepare(method, experts, base, weights, seed, name, params, labels):
    """Validate a merge's inputs and parameters; the method's kernel and the reference input."""
    labels = _labels(labels, len(experts), base is not None)
    spec = get_method(method)
    where = f" (tensor {name!r})" if name else ""
    if len(experts) == 0:
        raise ValueError(f"{method}: no experts given{where}")
    if spec.needs_base and base is None:
        raise ValueError(f"{method} needs a base model tensor{where}; set base_model in the recipe")
    if not spec.needs_base and base is not None:
        base, labels = None, labels[:-1]  # linear averages the experts only
    weights = [1.0] * len(experts) if weights is None else list(weights)
    if len(weights) != len(experts):
        raise ValueError(f"{method}: {len(weights)} weights given for {len(experts)} experts{where}")
    resolved = resolve_params(spec, params, len(experts))
    check_weights(spec, weights, resolved)  # numbers, not "0.5" or True
    weights = [float(w) for w in weights]
    _check_tensors(experts, base, where, labels)
    flat = [e if isinstance(e, RowStream) else e.reshape(-1) for e in experts]
    flat_base = base if base is None or isinstance(base, RowStream) else base.reshape(-1)
    return spec.prepare(flat, flat_base, weights, resolved, seed, name), (base if base is not None else experts[0])


def _labels(labels: Sequence[str] | None, n_experts: int, has_base: bool) -> list[str]:
    """The inputs' names for errors: the caller's, or "expert i" and "the base"."""
    default = [f"expert {i}" for i in range(n_experts)] + (["the base"] if has_base else [])
    if labels is None:
        return default
    if len(labels) != len(default):
        raise ValueError(f"{len(labels)} labels given for {n_experts} experts{' and a base' if has_base else ''}")
    return list(labels)


def _check_tensors(experts, base, where: str, labels: list[str]) -> None:
    """Same shapes, floating point, finite; `labels` names the experts, then the base."""
    shape = base.shape if base is not None else experts[0].shape
    what = labels[-1] if base is not None else labels[0]
    for label, e in zip(labels, experts):
        if e.shape != shape:
            raise ValueError(f"shape mismatch{where}: {label} has shape {tuple(e.shape)}, {what} has {tuple(shape)}")
    for label, t in zip(labels, [*experts, *([base] if base is not None else [])], strict=True):
        if t.dtype not in MERGEABLE_DTYPES:
            raise ValueError(f"{label}{where} has dtype {t.dtype}; {mergeable_names()} tensors are merged, no others")
        if not isinstance(t, RowStream) and not all_finite(t):  # a stream checks each window it reads
            raise ValueError(f"{label}{where} contains NaN or Inf values")


def mergeable_names() -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in MERGEABLE_DTYPES))


DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, DTYPE_ALIASES.get(value, value), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating-point dtype such as bfloat16, float16, float32; got {value!r}")
    return dtype
