"""The merge methods, one function each.

Each function sees the inputs flattened to 1-D, does its whole-tensor preparation (TIES
thresholds, DARE L1 norms) once, and returns a kernel that merges elements [start, stop) in
float32. The caller runs the kernel chunk by chunk, so peak extra memory is a few chunks,
whatever the number of experts or the size of the tensor. Kernels are purely elementwise with a
fixed loop over experts, which is why any chunking gives identical bits.

Kernels work in place on chunk-sized float32 buffers allocated once per merge (`_Scratch`) and
never fuse a multiply into an add (no `alpha=`, no addcmul with rounding in between), so every
element goes through the same roundings whatever the chunk boundaries. The returned chunk is a
view of a scratch buffer: the caller copies it out before asking for the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import kernels
from .dropout import _I32_POSITIONS, DropMask, stream_keys
from .registry import Param, register
from .stream import RowStream
from .topk import _SMALL, Bracket, RadixSelect, _kth_largest_select, keep_count, max_inside, sample_positions

Kernel = Callable[[int, int], torch.Tensor]

WEIGHTED_SUM_NORMALIZE = Param("normalize", True, "divide by the sum of the weights")
LAMBDA = Param("lambda", 1.0, "scale applied to the merged task vector")
DENSITY_TIES = Param("density", 0.2, "fraction of each task vector kept, by magnitude", per_model=True)
DENSITY_DARE = Param("density", 0.1, "probability that a task-vector entry survives the drop", per_model=True)
RESCALE = Param("rescale", True, "survivor rescale: true/'density' (1/density, the paper), 'l1', false",
                kind=object)  # a bool or a mode name: checked by _rescale_mode
DISJOINT_NORMALIZE = Param("normalize", True, "divide by the summed weights of the agreeing experts (disjoint mean)")
SUM_NORMALIZE_OPTION = Param("normalize", False, "divide the weighted sum by the sum of the weights (mergekit's option)")
INT8_MASK = Param("int8_mask", False, "accepted for mergekit compatibility; no effect (masks are bool)")

_NARROW = (torch.bfloat16, torch.float16, torch.float32)  # upcast to float32 exactly inside an op


DEFAULT_CHUNK = 1 << 18  # elements per chunk on CPU: 1 MiB of float32, cache-sized; measured fastest
GPU_CHUNK = 1 << 24      # on an accelerator: big enough that kernel launches do not dominate


def default_chunk(device: torch.device | str) -> int:
    """Elements per chunk of a merge, and per block of the whole-tensor preparation passes
    (TIES thresholds, L1 norms)."""
    return DEFAULT_CHUNK if torch.device(device).type == "cpu" else GPU_CHUNK


class _Scratch:
    """Chunk-sized work buffers for one merge, allocated on first use and reused for every chunk."""

    def __init__(self, device: torch.device):
        self.device = device
        self._bufs: dict = {}

    def __call__(self, key, m: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < m:
            buf = self._bufs[key] = torch.empty(m, dtype=dtype, device=self.device)
        return buf[:m]

    def ramp(self, m: int) -> torch.Tensor:
        """int32 0 .. m-1 (made once, for the largest m asked)."""
        buf = self._bufs.get("ramp")
        if buf is None or buf.numel() < m:
            buf = self._bufs["ramp"] = torch.arange(m, dtype=torch.int32, device=self.device)
        return buf[:m]


def _sub_into(out: torch.Tensor, a: torch.Tensor, b32: torch.Tensor) -> torch.Tensor:
    """out = float32(a) - b32, in one pass when `a` upcasts to float32 exactly."""
    if a.dtype in _NARROW:
        return torch.sub(a, b32, out=out)
    out.copy_(a)  # float64 inputs: round to float32 first, as .to(float32) would
    return out.sub_(b32)


def _load(out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return out.copy_(a)


def _scale_(t: torch.Tensor, w: float) -> torch.Tensor:
    return t if w == 1.0 else t.mul_(w)  # x * 1.0 == x exactly: skipping it changes no bits


def _weighted_sum_into(acc: torch.Tensor, tmp: torch.Tensor, parts: Sequence[torch.Tensor],
                       weights: Sequence[float]) -> torch.Tensor:
    """acc = ((p0 * w0) + p1 * w1) + ..., the products rounded before each add. Parts are float32."""
    torch.mul(parts[0], weights[0], out=acc) if weights[0] != 1.0 else acc.copy_(parts[0])
    for part, w in zip(parts[1:], weights[1:], strict=True):
        if w == 1.0:
            acc.add_(part)
        else:
            acc.add_(torch.mul(part, w, out=tmp))
    return acc


def _disjoint_mean_(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool,
                    scratch: _Scratch, m: int) -> torch.Tensor:
    """TIES: elect the sign of the weighted sum; weighted mean of the deltas that agree with it.

    An entry whose sum is exactly zero, or where no delta agrees, gets no update. With
    normalize=False the agreeing weighted deltas are summed, not averaged (mergekit's option).
    Overwrites `deltas` (float32 scratch buffers); returns a scratch buffer.

    Float arithmetic only (bool masks cost several times more per element on CPU): with s the
    elected sign, relu(d * s) is |d| where d agrees and 0 where not, so the agreeing sum is
    s * sum(w * relu(d * s)) -- the same bits as summing w * d over the agreeing d, since negating
    every term negates every rounded partial sum.
    """
    tmp = scratch("tmp", m)
    sign = _weighted_sum_into(scratch("sign", m), tmp, deltas, weights).sign_()

    def agreeing(d: torch.Tensor) -> torch.Tensor:  # |d| where d agrees with the sign, else 0
        return torch.mul(d, sign, out=d).clamp_min_(0.0)

    # the first expert's terms start both sums: no zero-filled buffers, no adds into them
    (d0, w0), *rest = zip(deltas, weights, strict=True)
    a0 = agreeing(d0)
    den = _scale_(torch.gt(a0, 0.0, out=scratch("den", m)), w0)  # w or 0, exact
    num = _scale_(a0, w0)
    for d, w in rest:
        a = agreeing(d)
        den.add_(_scale_(torch.gt(a, 0.0, out=tmp), w))
        num.add_(_scale_(a, w))
    if normalize:
        nonzero = torch.ne(den, 0.0, out=tmp)                  # 1.0 where den != 0
        den.add_(torch.neg(nonzero, out=scratch("tmp2", m)).add_(1.0))  # den, or 1 where it is 0
        num.div_(den).mul_(nonzero)                            # where(den != 0, num / den, 0)
    return num.mul_(sign)


def _weight_sum(weights: Sequence[float]) -> float:
    """What normalize: true divides by; registry.check_weights has refused a sum of (about) zero."""
    return float(sum(weights))


@register(
    "linear",
    "Weight averaging / model soup (Wortsman et al. 2022): sum(w_i * theta_i) / sum(w_i).",
    needs_base=False,
    params=(WEIGHTED_SUM_NORMALIZE,),
    divides_by_weight_sum=True,
)
def linear(experts, base, weights, params, seed, name) -> Kernel:
    scale = 1.0 / _weight_sum(weights) if params["normalize"] else 1.0
    scratch = _Scratch(experts[0].device)

    def kernel(start: int, stop: int) -> torch.Tensor:
        m = stop - start
        acc, tmp = scratch("acc", m), scratch("tmp", m)
        _load(acc, experts[0][start:stop])
        _scale_(acc, weights[0])
        for e, w in zip(experts[1:], weights[1:], strict=True):
            if w == 1.0 and e.dtype in _NARROW:
                acc.add_(e[start:stop])  # the upcast to float32 is exact, inside the add
            else:
                acc.add_(_scale_(_load(tmp, e[start:stop]), w))
        return _scale_(acc, scale)

    return kernel


@register(
    "task_arithmetic",
    "Task arithmetic (Ilharco et al. 2022): theta_0 + lambda * sum(w_i * (theta_i - theta_0)).",
    needs_base=True,
    params=(LAMBDA, SUM_NORMALIZE_OPTION, INT8_MASK),
    divides_by_weight_sum=True,
)
def task_arithmetic(experts, base, weights, params, seed, name) -> Kernel:
    scale = params["lambda"]
    if params["normalize"]:
        scale /= _weight_sum(weights)
    scratch = _Scratch(base.device)

    def kernel(start: int, stop: int) -> torch.Tensor:
        m = stop - start
        b, acc, tmp = _load(scratch("base", m), base[start:stop]), scratch("acc", m), scratch("tmp", m)
        _scale_(_sub_into(acc, experts[0][start:stop], b), weights[0])
        for e, w in zip(experts[1:], weights[1:], strict=True):
            acc.add_(_scale_(_sub_into(tmp, e[start:stop], b), w))
        return _scale_(acc, scale).add_(b)  # base + lambda * sum: the same bits in either order

    return kernel


def _ties_thresholds(experts, base, densities) -> list[float | None]:
    """Per expert, the k-th largest |delta| (None where density >= 1): one pass over the tensor
    for all experts, each chunk's magnitudes computed, fed to a Bracket, and dropped; for a
    RowStream, or where a bracket missed, two counting passes (RadixSelect)."""
    n = base.numel()
    todo = {i: keep_count(d, n) for i, d in enumerate(densities) if d < 1.0 and n > 0}  # nothing to trim in []
    if n <= _SMALL:
        return [_whole_tensor_threshold(experts[i], base, todo[i]) if i in todo else None for i in range(len(experts))]
    if isinstance(base, RowStream):
        # A bracket collects the values inside it, a share of n; a stream's memory must not grow
        # with n, so its thresholds come from two counting passes.
        found = _radix_thresholds(experts, base, todo)
        return [found.get(i) for i in range(len(experts))]

    # Experts with the same density share the sample positions (a function of n and k), and
    # every sample shares the base's values there.
    positions: dict[int, torch.Tensor] = {}
    base_at: dict[int, torch.Tensor] = {}
    brackets = {}
    for i, k in todo.items():
        if k not in positions:  # index_select gathers 3x faster than indexing with a tensor
            positions[k] = sample_positions(n, k).to(base.device)
            base_at[k] = base.index_select(0, positions[k]).to(torch.float32)
        sample = (experts[i].index_select(0, positions[k]).to(torch.float32) - base_at[k]).abs_()
        brackets[i] = Bracket(n, k, sample)
    if kernels.fused_on(base.device):  # |expert - base| made as the compiled loop reads them
        scratch = _Scratch(base.device)
        for start, stop, b in _base_blocks(base, scratch):
            for i in todo:
                brackets[i].feed_deltas(_arrays([experts[i][start:stop]], scratch)[0], b.numpy())
    else:
        for magnitudes in _magnitude_chunks(experts, base, todo):
            for i, mag in magnitudes:
                brackets[i].feed(mag)
    found = {i: bracket.result() for i, bracket in brackets.items()}
    # where the sampled bracket missed (adversarial data): two more passes, still exact
    found |= _radix_thresholds(experts, base, {i: todo[i] for i, f in found.items() if f is None})
    return [float(found[i]) if i in found else None for i in range(len(experts))]


def _magnitude_chunks(experts, base, todo):
    """Per chunk of the tensor, (i, |expert i - base|) for each i in todo: float32, in a buffer
    valid until the next magnitudes are made."""
    scratch = _Scratch(base.device)
    for start, stop, b in _base_blocks(base, scratch):
        mag = scratch("mag", stop - start)
        yield ((i, _sub_into(mag, experts[i][start:stop], b).abs_()) for i in todo)


def _base_blocks(base, scratch: _Scratch):
    """(start, stop, the base's elements [start, stop) in float32) for each block of a
    whole-tensor pass (default_chunk elements), in one scratch buffer reused block to block."""
    n = base.numel()
    block = default_chunk(base.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        yield start, stop, _load(scratch("base", stop - start), base[start:stop])


def _radix_thresholds(experts, base, ks: dict[int, int]) -> dict[int, float]:
    """The k-th largest |delta| of each expert i in ks (k = ks[i]), from two counting passes."""
    selects = {i: RadixSelect(k) for i, k in ks.items()}
    for _ in range(2 if selects else 0):
        for magnitudes in _magnitude_chunks(experts, base, selects):
            for i, mag in magnitudes:
                selects[i].feed(mag)
        for select in selects.values():
            select.end_pass()
    return {i: select.result() for i, select in selects.items()}


def _whole_tensor_threshold(expert, base, k: int) -> float:
    """The k-th largest |expert - base| of a small tensor, selected on all of it at once."""
    n = base.numel()
    return float(_kth_largest_select((expert[0:n].to(torch.float32) - base[0:n].to(torch.float32)).abs_(), k))


@register(
    "ties",
    "TIES-Merging (Yadav et al. 2023): trim each task vector to its top-density magnitudes, "
    "elect signs, disjoint mean.",
    needs_base=True,
    params=(DENSITY_TIES, LAMBDA, DISJOINT_NORMALIZE, INT8_MASK),
    elects_signs=True,
)
def ties(experts, base, weights, params, seed, name) -> Kernel:
    # |d| >= thr exactly where |d| > the largest float32 below thr: hardshrink trims in one pass
    shrink = [None if t is None else float(np.nextafter(np.float32(t), np.float32(0)))
              for t in _ties_thresholds(experts, base, params["density"])]
    lam, normalize = params["lambda"], params["normalize"]
    scratch = _Scratch(base.device)
    if kernels.fused_on(base.device):
        return _fused_elect_mean(experts, base, weights, normalize, lam, [-np.inf if t is None else t for t in shrink])

    def kernel(start: int, stop: int) -> torch.Tensor:
        m = stop - start
        b = _load(scratch("base", m), base[start:stop])
        deltas = []
        for i, (e, below) in enumerate(zip(experts, shrink, strict=True)):
            d = _sub_into(scratch(("d", i), m), e[start:stop], b)
            if below is not None:  # d where |d| >= the threshold, else 0
                torch.hardshrink(d, below, out=d)
            deltas.append(d)
        return _scale_(_disjoint_mean_(deltas, weights, normalize, scratch, m), lam).add_(b)

    return kernel


def _fused_elect_mean(experts, base, weights, normalize: bool, lam: float, below: Sequence[float],
                      dare: _Dare | None = None) -> Kernel:
    """TIES's and DARE-TIES's kernel on the CPU: merge_ops.fused.elect_mean reads each chunk of
    the experts as it is (bf16 included) and does the whole merge of it in one compiled loop."""
    fused, scratch = kernels.fused(), _Scratch(base.device)
    n = len(experts)
    below, w, lam32 = np.array(below, dtype=np.float32), np.array(weights, dtype=np.float32), np.float32(lam)
    if dare is None:
        keys, thresholds, scales = np.zeros((n, 2), np.uint64), np.zeros(n, np.uint64), np.ones(n, np.float32)
    else:
        keys, thresholds, scales = dare.fused_arguments()

    def kernel(start: int, stop: int) -> torch.Tensor:
        m = stop - start
        b, out = _load(scratch("base", m), base[start:stop]), scratch("out", m)
        chunks = _arrays([e[start:stop] for e in experts], scratch)
        fused.elect_mean(chunks, start, b.numpy(), below, dare is not None, keys, thresholds, scales, w, normalize,
                         lam32, out.numpy())
        return out

    return kernel


_AS_ARRAY = {torch.bfloat16: lambda c: c.view(torch.uint16).numpy(), torch.float32: torch.Tensor.numpy,
             torch.float64: torch.Tensor.numpy}


def _arrays(chunks: Sequence[torch.Tensor], scratch: _Scratch) -> tuple[np.ndarray, ...]:
    """CPU chunks as numpy arrays of one dtype, for merge_ops.fused (see fused.load): views of
    bfloat16 (as its uint16 bits), float32 or float64 tensors; float32 copies where the dtypes
    differ or numba has none (float16)."""
    dtypes = {c.dtype for c in chunks}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) in _AS_ARRAY:
        return tuple(_AS_ARRAY[dtype](c.contiguous()) for c in chunks)
    return tuple(_load(scratch(("f32", i), c.numel()), c).numpy() for i, c in enumerate(chunks))


# Chunk-sized buffers a merge holds at most, in float32 chunks. Measured (the process's peak RSS
# over one merge, glibc mapping every large block afresh): 10 + n_experts for DARE on torch's
# path, fewer for the other methods and the fused path, with 2 to 8 experts; 2 spare.
_SCRATCH_CHUNKS = 12
_STREAM_CHUNKS = 4


def scratch_bytes(n_experts: int, device: torch.device | str, streamed: bool = False) -> int:
    """Host memory a merge's chunk buffers take at most (default chunking; the merge of a tensor
    smaller than a chunk takes less). An accelerator merge keeps its buffers on the device.
    streamed: a merge_stream's, which also joins the slices that cross windows and, for TIES, holds
    RadixSelect's counters: 4 more chunks and the counters are reserved for them."""
    if torch.device(device).type != "cpu":
        return 0
    chunks = _SCRATCH_CHUNKS + n_experts + (_STREAM_CHUNKS if streamed else 0)
    return chunks * DEFAULT_CHUNK * 4 + (n_experts * RadixSelect.COUNTERS_BYTES if streamed else 0)


def kept_bytes(method: str, params: dict, n_experts: int, numel: int, device: torch.device | str) -> int:
    """Host bytes a merge of one whole tensor keeps besides its inputs, output and chunk buffers:
    TIES's bracket candidates (at most topk.max_inside per expert, float32) on a CPU merge of a
    tensor too large to select on at once."""
    if method == "ties" and numel > _SMALL and torch.device(device).type == "cpu":
        return n_experts * max_inside(numel) * 4
    return 0


def stream_passes(method: str, params: dict) -> int:
    """How often merge_stream reads a streamed tensor's inputs: TIES three times (two counting
    passes for its thresholds, then the merge), DARE with the L1 rescale twice, the others once."""
    if method == "ties":
        return 3
    return 2 if method in ("dare_linear", "dare_ties") and params.get("rescale") == "l1" else 1


class _Dare:
    """DARE's drop and rescale for one tensor's experts: the masks, and the rescale factors (for
    the L1 rescale, from a pre-pass over the tensor)."""

    def __init__(self, experts, base, params, seed, name):
        self.experts, densities, device = experts, params["density"], base.device
        self.masks = [DropMask(stream_keys(seed, name, i), densities[i], device) for i in range(len(experts))]
        self.fused = kernels.fused() if kernels.fused_on(device) and base.numel() <= _I32_POSITIONS else None
        self.scratch = _Scratch(device)
        mode = params["rescale"]
        if mode == "density":
            self.scales = [1.0 / d for d in densities]
        elif mode == "l1":  # match each task vector's L1 norm before and after the drop (mergekit's rescale_norm)
            self.scales = self._l1_scales(base)
        else:
            self.scales = [1.0] * len(experts)

    def _l1_scales(self, base) -> list[float]:
        prep = _Scratch(base.device)
        before, after = [0.0] * len(self.experts), [0.0] * len(self.experts)
        for start, stop, b in _base_blocks(base, prep):
            for i, e in enumerate(self.experts):
                if self.fused is not None:  # one compiled pass: |d|, the drop and both sums
                    bf, af = self.fused.l1_sums(_arrays([e[start:stop]], prep)[0], b.numpy(), start,
                                                not self.masks[i].drops_nothing, *self._fused_draw(i))
                else:
                    d, mag = prep("d", stop - start), prep("mag", stop - start)
                    _sub_into(d, e[start:stop], b)
                    bf = float(torch.abs(d, out=mag).sum(dtype=torch.float64))
                    af = float(self.drop_(mag, i, start, stop, 1.0).sum(dtype=torch.float64))
                before[i] += bf
                after[i] += af
        return [bf / af if af > 0 else 0.0 for bf, af in zip(before, after, strict=True)]

    def drop_(self, d: torch.Tensor, i: int, start: int, stop: int, scale: float) -> torch.Tensor:
        """d (elements [start, stop) of expert i's deltas), times 1.0 where the entry survives and
        0.0 where it is dropped, times scale; in place."""
        mask = self.masks[i]
        if mask.drops_nothing:
            return _scale_(d, scale)
        if self.fused is not None:
            k1, k2, threshold = self._fused_draw(i)
            self.fused.drop_(d.numpy(), k1, k2, start, threshold, np.float32(scale))
            return d
        m, buf = stop - start, self.scratch
        keep = mask.keep_into(start, stop, buf("keep", m), buf("h", m, torch.int32), buf("t", m, torch.int32),
                              buf.ramp(m))
        return _scale_(d.mul_(keep), scale)

    def _fused_draw(self, i: int) -> tuple[np.uint64, np.uint64, np.uint64]:
        """Expert i's draw keys and keep threshold, as merge_ops.fused's loops take them."""
        mask = self.masks[i]
        return np.uint64(mask.keys[0]), np.uint64(mask.keys[1]), np.uint64(mask.threshold)

    def delta_into(self, out: torch.Tensor, i: int, start: int, stop: int, b: torch.Tensor) -> torch.Tensor:
        """Expert i's dropped-and-rescaled deltas for elements [start, stop), written to out."""
        return self.drop_(_sub_into(out, self.experts[i][start:stop], b), i, start, stop, self.scales[i])

    def fused_arguments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The keys, keep thresholds and scales as fused.elect_mean takes them."""
        keys = np.array([m.keys for m in self.masks], dtype=np.uint64)
        thresholds = np.array([m.threshold for m in self.masks], dtype=np.uint64)
        return keys, thresholds, np.array(self.scales, dtype=np.float32)


@register(
    "dare_linear",
    "DARE (Yu et al. 2023): drop task-vector entries with p = 1 - density, rescale survivors, "
    "then task arithmetic.",
    needs_base=True,
    params=(DENSITY_DARE, LAMBDA, RESCALE, SUM_NORMALIZE_OPTION, INT8_MASK),
    divides_by_weight_sum=True,
)
def dare_linear(experts, base, weights, params, seed, name) -> Kernel:
    scratch = _Scratch(base.device)
    dare = _Dare(experts, base, params, seed, name)
    lam = params["lambda"]
    if params["normalize"]:
        lam /= _weight_sum(weights)

    def kernel(start: int, stop: int) -> torch.Tensor:
        m = stop - start
        b = _load(scratch("base", m), base[start:stop])
        deltas = [dare.delta_into(scratch(("d", i), m), i, start, stop, b) for i in range(len(experts))]
        total = _weighted_sum_into(scratch("acc", m), scratch("tmp", m), deltas, weights)
        return _scale_(total, lam).add_(b)

    return kernel


@register(
    "dare_ties",
    "DARE-TIES (Yu et al. 2023): DARE's random drop and rescale, then TIES sign election and disjoint mean.",
    needs_base=True,
    params=(DENSITY_DARE, LAMBDA, RESCALE, DISJOINT_NORMALIZE, INT8_MASK),
    elects_signs=True,
)
def dare_ties(experts, base, weights, params, seed, name) -> Kernel:
    scratch = _Scratch(base.device)
    dare = _Dare(experts, base, params, seed, name)
    lam, normalize = params["lambda"], params["normalize"]
    if dare.fused is not None:  # DARE drops; it never trims
        return _fused_elect_mean(experts, base, weights, normalize, lam, [-np.inf] * len(experts), dare)

    def kernel(start: int, stop: int) -> torch.Tensor:
        m = stop - start
        b = _load(scratch("base", m), base[start:stop])
        deltas = [dare.delta_into(scratch(("d", i), m), i, start, stop, b) for i in range(len(experts))]
        return _scale_(_disjoint_mean_(deltas, weights, normalize, scratch, m), lam).add_(b)

    return kernel
