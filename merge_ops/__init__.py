"""merge_ops: the merge math, in torch (compiled numba loops for the CPU's hot ones). No I/O, no orchestration.

    merge_tensors(method, experts, base, *, weights, seed, name, **params) -> Tensor
    merge_stream(...): the same for tensors too large to hold, read as RowStreams, written in rows
    METHODS: name -> Method (description, needs_base, params with defaults)
    scratch_bytes(...), kept_bytes(...): host memory a merge holds beyond its inputs and output
    output_bytes(shape, dtype, device): host memory its output takes at once
    stream_passes(method, params): how often a streamed merge reads its inputs
"""

from .merge import (
    DEFAULT_CHUNK,
    GPU_CHUNK,
    MERGEABLE_DTYPES,
    default_chunk,
    merge_stream,
    merge_tensors,
    mergeable_names,
    output_bytes,
)
from .methods import kept_bytes, scratch_bytes, stream_passes
from .registry import METHODS, Method, Param, get_method
from .stream import RowStream, window_rows

__all__ = ["DEFAULT_CHUNK", "GPU_CHUNK", "MERGEABLE_DTYPES", "METHODS", "Method", "Param", "RowStream", "default_chunk",
           "get_method", "kept_bytes", "merge_stream", "merge_tensors", "mergeable_names", "output_bytes",
           "scratch_bytes", "stream_passes", "window_rows"]
