"""The merge methods, one function each.

Each function sees the inputs flattened to 1-D, does its whole-tensor preparation (TIES
thresholds, DARE L1 norms) once, and returns a kernel that merges elements [start, stop) in
float32. The caller runs the kernel chunk by chunk, so peak extra memory is one tensor's worth
for the preparation plus a few chunks, whatever the number of experts. Kernels are purely
elementwise with a fixed loop over experts, which is why any chunking gives identical bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .dropout import keep_mask, stream_keys
from .registry import Param, register
from .topk import keep_count, kth_largest

Kernel = Callable[[int, int], torch.Tensor]

WEIGHTED_SUM_NORMALIZE = Param("normalize", True, "divide by the sum of the weights")
LAMBDA = Param("lambda", 1.0, "scale applied to the merged task vector")
DENSITY_TIES = Param("density", 0.2, "fraction of each task vector kept, by magnitude", per_model=True)
DENSITY_DARE = Param("density", 0.1, "probability that a task-vector entry survives the drop", per_model=True)
RESCALE = Param("rescale", True, "survivor rescale: true/'density' (1/density, the paper), 'l1', false")
DISJOINT_NORMALIZE = Param("normalize", True, "divide by the summed weights of the agreeing experts (disjoint mean)")
INT8_MASK = Param("int8_mask", False, "accepted for mergekit compatibility; no effect (masks are bool)")


def _f32(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return t[start:stop].to(torch.float32)


def _delta(expert: torch.Tensor, base: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return _f32(expert, start, stop) - _f32(base, start, stop)


def _weighted_sum(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = parts[0] * weights[0]
    for part, w in zip(parts[1:], weights[1:], strict=True):
        total = total + part * w
    return total


def _disjoint_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """TIES: elect the sign of the weighted sum; weighted mean of the deltas that agree with it.

    An entry whose sum is exactly zero, or where no delta agrees, gets no update. With
    normalize=False the agreeing weighted deltas are summed, not averaged (mergekit's option).
    """
    sign = torch.sign(_weighted_sum(deltas, weights))
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for d, w in zip(deltas, weights, strict=True):
        agree = (d * sign) > 0
        num = num + torch.where(agree, d * w, 0.0)
        den = den + torch.where(agree, w, 0.0)
    if not normalize:
        return num
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def _check_weight_sum(weights: Sequence[float], method: str) -> float:
    total = float(sum(weights))
    if total == 0.0:
        raise ValueError(f"weights {list(weights)} sum to zero; {method} with normalize=true divides by their sum")
    return total


@register(
    "linear",
    "Weight averaging / model soup (Wortsman et al. 2022): sum(w_i * theta_i) / sum(w_i).",
    needs_base=False,
    params=(WEIGHTED_SUM_NORMALIZE,),
)
def linear(experts, base, weights, params, seed, name) -> Kernel:
    scale = 1.0 / _check_weight_sum(weights, "linear") if params["normalize"] else 1.0

    def kernel(start: int, stop: int) -> torch.Tensor:
        return _weighted_sum([_f32(e, start, stop) for e in experts], weights) * scale

    return kernel


@register(
    "task_arithmetic",
    "Task arithmetic (Ilharco et al. 2022): theta_0 + lambda * sum(w_i * (theta_i - theta_0)).",
    needs_base=True,
    params=(LAMBDA, Param("normalize", False, "divide the weighted sum by the sum of the weights (mergekit's option)")),
)
def task_arithmetic(experts, base, weights, params, seed, name) -> Kernel:
    scale = params["lambda"]
    if params["normalize"]:
        scale /= _check_weight_sum(weights, "task_arithmetic")

    def kernel(start: int, stop: int) -> torch.Tensor:
        deltas = [_delta(e, base, start, stop) for e in experts]
        return _f32(base, start, stop) + scale * _weighted_sum(deltas, weights)

    return kernel


@register(
    "ties",
    "TIES-Merging (Yadav et al. 2023): trim each task vector to its top-density magnitudes, "
    "elect signs, disjoint mean.",
    needs_base=True,
    params=(DENSITY_TIES, LAMBDA, DISJOINT_NORMALIZE, INT8_MASK),
)
def ties(experts, base, weights, params, seed, name) -> Kernel:
    thresholds = []
    for e, density in zip(experts, params["density"], strict=True):
        if density >= 1.0:
            thresholds.append(None)
            continue
        magnitude = (e.to(torch.float32) - base.to(torch.float32)).abs_()
        thresholds.append(kth_largest(magnitude, keep_count(density, magnitude.numel())))
        del magnitude
    lam = params["lambda"]

    def kernel(start: int, stop: int) -> torch.Tensor:
        deltas = []
        for e, thr in zip(experts, thresholds, strict=True):
            d = _delta(e, base, start, stop)
            deltas.append(d if thr is None else torch.where(d.abs() >= thr, d, 0.0))
        return _f32(base, start, stop) + lam * _disjoint_mean(deltas, weights, params["normalize"])

    return kernel


def _dare_deltas(experts, base, params, seed, name) -> Callable[[int, int], list[torch.Tensor]]:
    """Dropped-and-rescaled deltas for elements [start, stop), one per expert."""
    keys = [stream_keys(seed, name, i) for i in range(len(experts))]
    densities = params["density"]
    device = base.device

    def dropped(i: int, start: int, stop: int) -> torch.Tensor:
        d = _delta(experts[i], base, start, stop)
        return torch.where(keep_mask(keys[i], start, stop, densities[i], device), d, 0.0)

    n = base.numel()
    mode = params["rescale"]
    if mode == "density":
        scales = [1.0 / d for d in densities]
    elif mode == "l1":  # match each task vector's L1 norm before and after the drop (mergekit's rescale_norm)
        scales = []
        for i, e in enumerate(experts):
            before = after = 0.0
            for start in range(0, n, 1 << 22):
                stop = min(n, start + (1 << 22))
                before += float(_delta(e, base, start, stop).abs().sum(dtype=torch.float64))
                after += float(dropped(i, start, stop).abs().sum(dtype=torch.float64))
            scales.append(before / after if after > 0 else 0.0)
    else:
        scales = [1.0] * len(experts)

    def deltas(start: int, stop: int) -> list[torch.Tensor]:
        return [dropped(i, start, stop) * scales[i] for i in range(len(experts))]

    return deltas


@register(
    "dare_linear",
    "DARE (Yu et al. 2023): drop task-vector entries with p = 1 - density, rescale survivors, "
    "then task arithmetic.",
    needs_base=True,
    params=(DENSITY_DARE, LAMBDA, RESCALE, INT8_MASK),
)
def dare_linear(experts, base, weights, params, seed, name) -> Kernel:
    deltas = _dare_deltas(experts, base, params, seed, name)
    lam = params["lambda"]

    def kernel(start: int, stop: int) -> torch.Tensor:
        return _f32(base, start, stop) + lam * _weighted_sum(deltas(start, stop), weights)

    return kernel


@register(
    "dare_ties",
    "DARE-TIES (Yu et al. 2023): DARE's random drop and rescale, then TIES sign election and disjoint mean.",
    needs_base=True,
    params=(DENSITY_DARE, LAMBDA, RESCALE, DISJOINT_NORMALIZE, INT8_MASK),
)
def dare_ties(experts, base, weights, params, seed, name) -> Kernel:
    deltas = _dare_deltas(experts, base, params, seed, name)
    lam = params["lambda"]

    def kernel(start: int, stop: int) -> torch.Tensor:
        return _f32(base, start, stop) + lam * _disjoint_mean(deltas(start, stop), weights, params["normalize"])

    return kernel
