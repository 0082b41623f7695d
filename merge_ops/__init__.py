"""merge_ops: the merge math, in torch (numpy for integer steps on CPU). No I/O, no orchestration.

    merge_tensors(method, experts, base, *, weights, seed, name, **params) -> Tensor
    METHODS: name -> Method (description, needs_base, params with defaults)
    scratch_bytes(...), kept_draw_bytes(...): host memory a merge holds beyond its inputs and output
"""

from .merge import DEFAULT_CHUNK, GPU_CHUNK, default_chunk, merge_tensors
from .methods import kept_draw_bytes, scratch_bytes
from .registry import METHODS, Method, Param, get_method

__all__ = ["DEFAULT_CHUNK", "GPU_CHUNK", "METHODS", "Method", "Param", "default_chunk", "get_method",
           "kept_draw_bytes", "merge_tensors", "scratch_bytes"]
