"""merge_ops: the merge math, pure torch. No I/O, no orchestration.

    merge_tensors(method, experts, base, *, weights, seed, name, **params) -> Tensor
    METHODS: name -> Method (description, needs_base, params with defaults)
"""

from .merge import DEFAULT_CHUNK, GPU_CHUNK, default_chunk, merge_tensors
from .registry import METHODS, Method, Param, get_method

__all__ = ["DEFAULT_CHUNK", "GPU_CHUNK", "METHODS", "Method", "Param", "default_chunk", "get_method", "merge_tensors"]
