"""merge_ops against slow, obviously-correct references written here, independently.

The references loop over elements and experts in float64, find the top-k by a full argsort,
and draw DARE's mask with a pure-Python re-implementation of the documented hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import merge_ops
from merge_ops import merge_tensors, stream_passes

# ---------------------------------------------------------------- references (slow, plain)


def ref_keep_count(density: float, n: int) -> int:
    return min(n, max(1, round(density * n)))


def ref_trim(delta: list[float], density: float) -> list[float]:
    if density >= 1.0:
        return list(delta)
    mags = torch.tensor([abs(d) for d in delta], dtype=torch.float64)
    order = torch.argsort(mags, descending=True)
    threshold = mags[order[ref_keep_count(density, len(delta)) - 1]].item()
    return [d if abs(d) >= threshold else 0.0 for d in delta]


def ref_elect_mean(columns: list[list[float]], weights: list[float], normalize: bool = True) -> list[float]:
    out = []
    for j in range(len(columns[0])):
        total = sum(w * col[j] for col, w in zip(columns, weights))
        sign = (total > 0) - (total < 0)
        num = den = 0.0
        for col, w in zip(columns, weights):
            if col[j] != 0 and ((col[j] > 0) - (col[j] < 0)) == sign:
                num += w * col[j]
                den += w
        out.append(num if not normalize else num / den if den != 0 else 0.0)
    return out


def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def ref_keep(seed: int, name: str, expert: int, position: int, density: float) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{name}\0{expert}".encode(), digest_size=8).digest()
    k1, k2 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
    return _ref_draw(k1, k2, position) < int(density * 2**32)


def _ref_draw(k1: int, k2: int, position: int) -> int:
    """The documented formula, in Python integers."""
    m = 0xFFFFFFFF
    return _lowbias32((((position & m) + k2) & m) ^ k1 ^ _lowbias32(position >> 32))


def as_f64_lists(experts, base):
    """Deltas as Python floats of the float32 values, exactly as the method sees them."""
    b = base.to(torch.float32).reshape(-1).double().tolist()
    cols = [(e.to(torch.float32) - base.to(torch.float32)).reshape(-1).double().tolist() for e in experts]
    return b, cols


def reference(method, experts, base, weights, seed=0, name="", **p):
    weights = weights or [1.0] * len(experts)
    n_e = len(experts)
    density = p.get("density")
    densities = density if isinstance(density, list) else [density] * n_e
    lam = p.get("lambda", 1.0)
    if method == "linear":
        flat = [e.to(torch.float32).reshape(-1).double().tolist() for e in experts]
        s = sum(weights) if p.get("normalize", True) else 1.0
        out = [sum(w * col[j] for col, w in zip(flat, weights)) / s for j in range(len(flat[0]))]
        return torch.tensor(out, dtype=torch.float64).view(experts[0].shape)
    b, cols = as_f64_lists(experts, base)
    if method == "task_arithmetic":
        mixed = [sum(w * col[j] for col, w in zip(cols, weights)) for j in range(len(b))]
    elif method == "ties":
        trimmed = [ref_trim(col, d) for col, d in zip(cols, densities)]
        mixed = ref_elect_mean(trimmed, weights, p.get("normalize", True))
    else:  # dare_linear / dare_ties: survivors rescaled by 1/density, or with rescale="l1" by
        # the ratio of the task vector's L1 norm before and after the drop
        kept = [
            [c if ref_keep(seed, name, i, j, d) else 0.0 for j, c in enumerate(col)]
            for i, (col, d) in enumerate(zip(cols, densities))
        ]
        if p.get("rescale", True) == "l1":
            norms = [(sum(abs(c) for c in col), sum(abs(c) for c in k)) for col, k in zip(cols, kept)]
            scales = [before / after if after > 0 else 0.0 for before, after in norms]
        else:
            scales = [1 / d for d in densities]
        dropped = [[c * s for c in k] for k, s in zip(kept, scales)]
        if method == "dare_linear":
            total = sum(weights) if p.get("normalize", False) else 1.0
            mixed = [sum(w * col[j] for col, w in zip(dropped, weights)) / total for j in range(len(b))]
        else:
            mixed = ref_elect_mean(dropped, weights, p.get("normalize", True))
    out = [b[j] + lam * mixed[j] for j in range(len(b))]
    return torch.tensor(out, dtype=torch.float64).view(base.shape)


# ---------------------------------------------------------------- strategies

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def merge_case(draw, integer_valued=False):
    n_experts = draw(st.integers(1, 8))
    shape = tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))

    def tensor():
        if integer_valued:  # many equal magnitudes: stresses ties at the top-k threshold
            return torch.randint(-3, 4, shape, generator=gen).to(dtype)
        return torch.randn(shape, generator=gen).to(dtype)

    base = tensor()
    experts = [base.float() + tensor().float() * 0.5 for _ in range(n_experts)]
    experts = [e.to(dtype) for e in experts]
    weights = draw(st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0]), min_size=n_experts, max_size=n_experts))
    density = draw(st.sampled_from([0.1, 0.2, 0.35, 0.5, 0.9, 1.0]))
    return experts, base, weights, density


def assert_close(actual, expected):
    torch.testing.assert_close(actual.double(), expected, rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------- methods vs references

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(merge_case(), st.booleans())
def test_linear_matches_reference(case, normalize):
    experts, base, weights, _ = case
    got = merge_tensors("linear", experts, weights=weights, normalize=normalize, out_dtype=torch.float32)
    assert_close(got, reference("linear", experts, None, weights, normalize=normalize))


@SETTINGS
@given(merge_case(), st.sampled_from([1.0, 0.5, 1.3]))
def test_task_arithmetic_matches_reference(case, lam):
    experts, base, weights, _ = case
    got = merge_tensors("task_arithmetic", experts, base, weights=weights, out_dtype="float32", **{"lambda": lam})
    assert_close(got, reference("task_arithmetic", experts, base, weights, **{"lambda": lam}))


PATHS = st.sampled_from(["fused", "torch"])


@SETTINGS
@given(st.one_of(merge_case(), merge_case(integer_valued=True)), st.booleans(), PATHS)
def test_ties_matches_reference(case, normalize, path):
    experts, base, weights, density = case
    with kernels(path):
        got = merge_tensors("ties", experts, base, weights=weights, density=density, normalize=normalize,
                            out_dtype=torch.float32)
    assert_close(got, reference("ties", experts, base, weights, density=density, normalize=normalize))


@SETTINGS
@given(merge_case(), st.integers(0, 3))
def test_ties_per_expert_density(case, seed):
    experts, base, weights, _ = case
    densities = [[0.1, 0.3, 0.6, 1.0][(i + seed) % 4] for i in range(len(experts))]
    got = merge_tensors("ties", experts, base, weights=weights, density=densities, out_dtype=torch.float32)
    assert_close(got, reference("ties", experts, base, weights, density=densities))


@SETTINGS
@given(merge_case(), st.sampled_from(["dare_linear", "dare_ties"]), st.integers(0, 5), st.text(max_size=8),
       st.sampled_from([True, "l1"]), st.booleans(), PATHS)
def test_dare_matches_reference(case, method, seed, name, rescale, normalize, path):
    experts, base, weights, density = case
    with kernels(path):
        got = merge_tensors(method, experts, base, weights=weights, density=density, seed=seed, name=name,
                            rescale=rescale, normalize=normalize, out_dtype=torch.float32)
    want = reference(method, experts, base, weights, seed=seed, name=name, density=density, rescale=rescale,
                     normalize=normalize)
    assert_close(got, want)


@contextlib.contextmanager
def kernels(path: str):
    """Run the element loops on one implementation (merge_ops.kernels): "fused" (numba, a CPU
    merge) or "torch" (an accelerator's), whatever this machine would pick."""
    with mock.patch.object(merge_ops.kernels, "fused_on", lambda device: path == "fused"):
        yield


@pytest.fixture(params=["fused", "torch"])
def kernel_path(request):
    """Tests that take this fixture run on both implementations."""
    with kernels(request.param):
        yield request.param


def test_ties_threshold_exact_on_large_tensor(kernel_path):
    """Large enough to take the sampled-bracket path of the top-k selection."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(1_200_000, generator=gen)
    experts = [base + torch.randn(1_200_000, generator=gen) * 0.01 for _ in range(2)]
    # with one expert, TIES is exactly the trimmed delta added to the base
    single = merge_tensors("ties", experts[:1], base, density=0.2)
    delta = experts[0] - base
    thr = torch.sort(delta.abs(), descending=True).values[ref_keep_count(0.2, delta.numel()) - 1]
    assert torch.equal(single, base + torch.where(delta.abs() >= thr, delta, 0.0))
    both = merge_tensors("ties", experts, base, density=0.2, chunk_size=None)
    assert both.shape == base.shape and torch.isfinite(both).all()


def _kth_largest(values: torch.Tensor, k: int, block: int = 100_000) -> float:
    """The k-th largest of non-negative values the way TIES finds it: a sampled bracket over
    streamed blocks, and where it misses, TIES's own fallback (RadixSelect's two counting passes,
    over the magnitudes of `values` against a zero base)."""
    from merge_ops.methods import _radix_thresholds
    from merge_ops.topk import Bracket, sample_positions

    n = values.numel()
    bracket = Bracket(n, k, values[sample_positions(n, k)])
    for start in range(0, n, block):
        bracket.feed(values[start:start + block])
    found = bracket.result()
    if found is not None:
        return float(found)
    return _radix_thresholds([values], torch.zeros_like(values), {0: k})[0]


@pytest.mark.parametrize("changed", [0.0, 0.1], ids=["frozen", "mostly-frozen"])
def test_ties_threshold_exact_when_magnitudes_tie_in_bulk(kernel_path, changed):
    """An expert that left most of a tensor as it was: its zero deltas all tie at the threshold,
    fill the sampled bracket, and the threshold comes from RadixSelect instead, still exact."""
    gen = torch.Generator().manual_seed(5)
    n = 1_000_000
    base = torch.randn(n, generator=gen)
    delta = torch.where(torch.rand(n, generator=gen) < changed, torch.randn(n, generator=gen) * 0.01, 0.0)
    expert = base + delta
    delta = expert - base
    for density in (0.05, 0.2):
        thr = torch.sort(delta.abs(), descending=True).values[ref_keep_count(density, n) - 1]
        got = merge_tensors("ties", [expert], base, density=density)
        assert torch.equal(got, base + torch.where(delta.abs() >= thr, delta, 0.0)), density


def test_topk_bracket_misses_are_selected_exactly_on_adversarial_data(kernel_path):
    from merge_ops.topk import Bracket, sample_positions

    values = torch.cat([torch.zeros(600_000), torch.arange(1, 1001, dtype=torch.float32)])
    missed = 0
    for k in (1, 500, 1000, 1001, 300_000, 600_000):
        expected = torch.sort(values, descending=True).values[k - 1]
        assert _kth_largest(values, k) == expected, k
        bracket = Bracket(values.numel(), k, values[sample_positions(values.numel(), k)])
        bracket.feed(values)
        missed += bracket.result() is None
    assert missed, "no bracket missed: the data no longer exercises the fallback"


def test_topk_bracket_is_exact_on_tied_and_continuous_magnitudes(kernel_path):
    # bf16 deltas take few distinct values, so the k-th largest sits in a run of ties; the
    # bracket test works on bit patterns, so check it against a sort on both kinds of data
    from merge_ops.topk import Bracket, sample_positions

    gen = torch.Generator().manual_seed(11)
    base = (torch.randn(700_000, generator=gen) * 0.02).to(torch.bfloat16)
    expert = (base.float() + torch.randn(700_000, generator=gen) * 0.002).to(torch.bfloat16)
    tied = (expert.float() - base.float()).abs()
    continuous = torch.randn(700_000, generator=gen).abs()
    for values in (tied, continuous):
        ranked = torch.sort(values, descending=True).values
        for k in (1, 7_000, 140_000, 350_001, 699_999, 700_000):
            assert _kth_largest(values, k) == ranked[k - 1], k
        for k in (7_000, 140_000, 350_001):  # away from the ends, the bracket itself finds it
            bracket = Bracket(values.numel(), k, values[sample_positions(values.numel(), k)])
            for start in range(0, values.numel(), 100_000):
                bracket.feed(values[start:start + 100_000])
            assert bracket.result() == ranked[k - 1], k


# ---------------------------------------------------------------- chunking, dtypes, determinism

ALL = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]


@settings(max_examples=40, deadline=None)
@given(merge_case(), st.sampled_from(ALL), st.integers(1, 50), st.sampled_from([True, "l1"]), PATHS)
def test_chunked_equals_unchunked_bit_for_bit(case, method, chunk, rescale, path):
    experts, base, weights, density = case
    params = {} if method in ("linear", "task_arithmetic") else {"density": density}
    if method.startswith("dare"):
        params["rescale"] = rescale  # l1: the merge pass reads the pre-pass's draws back at any offset
    with kernels(path):
        whole = merge_tensors(method, experts, base, weights=weights, chunk_size=None, name="w", **params)
        chunked = merge_tensors(method, experts, base, weights=weights, chunk_size=chunk, name="w", **params)
    assert torch.equal(whole, chunked)


@settings(max_examples=40, deadline=None)
@given(merge_case(), st.sampled_from(ALL), st.integers(1, 50), st.sampled_from([True, "l1"]), PATHS)
def test_written_in_blocks_equals_returned_bit_for_bit(case, method, block, rescale, path):
    """merge_tensors(write=): the merged rows, a block at a time (here `block` elements' worth of
    whole rows, so blocks end inside chunks), are the tensor merge_tensors returns."""
    experts, base, weights, density = case
    params = {} if method in ("linear", "task_arithmetic") else {"density": density}
    if method.startswith("dare"):
        params["rescale"] = rescale
    written = []
    with kernels(path), mock.patch.object(merge_ops.merge, "_BLOCK_ELEMENTS", block):
        whole = merge_tensors(method, experts, base, weights=weights, name="w", chunk_size=7, **params)
        assert merge_tensors(method, experts, base, weights=weights, name="w", chunk_size=7,
                             write=lambda rows: written.append(rows.clone()), **params) is None
    if whole.dim() == 0:
        assert len(written) == 1 and torch.equal(written[0], whole)
        return
    assert all(w.shape[1:] == whole.shape[1:] for w in written)
    assert torch.equal(torch.cat(written), whole)


def row_streams(tensors, labels, window, reads=None, read_ahead=None, fills=False):
    """RowStreams over in-memory tensors; `reads` (a list) collects the rows each read asks for.
    fills: the reads fill the stream's buffers (as flows/unit's do) instead of returning copies."""
    def reader(t):
        def read_rows(r0, r1, out=None):
            if reads is not None:
                reads.append(r1 - r0)
            return t[r0:r1].clone() if out is None else out.copy_(t[r0:r1].reshape(-1))
        return read_rows
    return [merge_ops.RowStream(t.shape, t.dtype, reader(t), window, label, read_ahead=read_ahead, fills=fills)
            for t, label in zip(tensors, labels)]


def merge_streamed(method, experts, base, window, reads=None, read_ahead=None, fills=False, **kw):
    ex = row_streams(experts, [f"expert {i}" for i in range(len(experts))], window, reads, read_ahead, fills)
    b = row_streams([base], ["base"], window, reads, read_ahead, fills)[0] if base is not None else None
    blocks = []
    merge_ops.merge_stream(method, ex, b, write=lambda rows: blocks.append(rows.clone()), **kw)
    assert all(len(blk) <= window for blk in blocks)
    return torch.cat(blocks)


@settings(max_examples=40, deadline=None)
@given(merge_case(), st.sampled_from(ALL), st.integers(1, 5), st.sampled_from([True, "l1"]), PATHS, st.booleans())
def test_streamed_equals_whole_bit_for_bit_small(case, method, window, rescale, path, fills):
    experts, base, weights, density = case
    if base.dim() == 0:
        return
    params = {} if method in ("linear", "task_arithmetic") else {"density": density}
    if method.startswith("dare"):
        params["rescale"] = rescale
    with kernels(path):
        whole = merge_tensors(method, experts, base, weights=weights, name="w", **params)
        streamed = merge_streamed(method, experts, base, window, fills=fills, weights=weights, name="w", **params)
    assert torch.equal(streamed, whole)


@pytest.fixture(scope="module")
def wide():
    """A bf16 tensor of 700 x 1003 (several chunks, TIES's sampled-bracket path), 3 experts."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(700, 1003, generator=g) * 0.02).to(torch.bfloat16)
    return [(base.float() + torch.randn(700, 1003, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)], base


@pytest.mark.parametrize("method, params, passes", [
    ("linear", {}, 1), ("task_arithmetic", {}, 1), ("ties", {"density": 0.2}, 3),
    ("dare_linear", {"density": 0.3}, 1), ("dare_ties", {"density": 0.3, "rescale": "l1"}, 2),
])
@pytest.mark.parametrize("window", [1, 37, 700])  # 1 row: a chunk spans many windows; 37: windows end inside chunks
@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("fills", [False, True], ids=["new-windows", "reused-buffers"])
def test_streamed_equals_whole_bit_for_bit(wide, method, params, passes, window, ahead, fills, kernel_path):
    from concurrent.futures import ThreadPoolExecutor

    experts, base = wide
    kw = dict(weights=[0.5, 1.0, 0.7], seed=3, name="w", **params)
    reads = []
    with ThreadPoolExecutor(1) as pool:
        got = merge_streamed(method, experts, base if method != "linear" else None, window, reads,
                             pool if ahead else None, fills, **kw)
    assert torch.equal(got, merge_tensors(method, experts, base, **kw))
    inputs = len(experts) + (method != "linear")
    # every pass reads every input once, window by window (a window holding all rows, once in all)
    assert sum(reads) == inputs * 700 * (passes if window < 700 else 1)
    assert stream_passes(method, params) == passes  # what units size their budget share by


@pytest.mark.parametrize("ahead", [False, True])
def test_a_filling_stream_reads_every_window_into_the_same_buffers(wide, ahead):
    """With fills, a stream's windows (every pass's) land in one buffer, or two with read-ahead:
    the allocator never sees a window come and go. Slices that cross windows are copied before
    their buffer is read into again."""
    from concurrent.futures import ThreadPoolExecutor

    experts, _ = wide
    t = experts[0]
    targets = []

    def read_rows(r0, r1, out):
        targets.append(out)  # kept alive: a new allocation could not take its address
        return out.copy_(t[r0:r1].reshape(-1))

    with ThreadPoolExecutor(1) as pool:
        stream = merge_ops.RowStream(t.shape, t.dtype, read_rows, 37, "x", read_ahead=pool if ahead else None,
                                     fills=True)
        flat = t.reshape(-1)
        for _ in range(2):  # two passes, in slices that cross windows
            for start in range(0, flat.numel(), 50_000):
                assert torch.equal(stream[start:start + 50_000], flat[start:start + 50_000])
    assert len(targets) == 2 * math.ceil(700 / 37)
    assert len({o.data_ptr() for o in targets}) == (2 if ahead else 1)


def test_streamed_ties_threshold_exact_when_the_bracket_misses(wide):
    """A missed bracket selects again in two more streamed passes (histograms of bit patterns)."""
    from merge_ops.topk import Bracket

    experts, base = wide
    kw = dict(weights=[0.5, 1.0, 0.7], name="w", density=0.2)
    want = merge_tensors("ties", experts, base, **kw)
    with mock.patch.object(Bracket, "result", lambda self: None):
        assert torch.equal(merge_streamed("ties", experts, base, 50, **kw), want)
        assert torch.equal(merge_tensors("ties", experts, base, **kw), want)


def test_radix_select_is_exact():
    from merge_ops.topk import RadixSelect

    g = torch.Generator().manual_seed(5)
    tied = (torch.randn(300_000, generator=g) * 0.01).to(torch.bfloat16).float().abs()
    for values in (torch.randn(300_000, generator=g).abs(), tied, torch.cat([torch.zeros(1000), torch.arange(1, 50.0)])):
        ranked = torch.sort(values, descending=True).values
        for k in (1, 2, 17, 1000, values.numel() // 3, values.numel()):
            select = RadixSelect(k)
            for _ in range(2):
                for i in range(0, values.numel(), 7777):
                    select.feed(values[i:i + 7777])
                select.end_pass()
            assert select.result() == float(ranked[k - 1]), k


def test_stream_names_the_input_and_rows_with_bad_values(wide):
    experts, base = wide
    bad = experts[1].clone()
    bad[455, 3] = float("nan")
    with pytest.raises(ValueError, match=r"expert 1 contains NaN or Inf values \(rows 450\.\.500\)"):
        merge_streamed("task_arithmetic", [experts[0], bad], base, 50)


_RSS = """
def rss(key):  # bytes, from /proc/self/status
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
"""

_PEAK_STREAMED = _RSS + """
import json, sys, numpy as np, torch
from concurrent.futures import ThreadPoolExecutor
from unittest import mock
import merge_ops, merge_ops.kernels

rows, cols, k, window = 4096, 2048, 8, 64
path = sys.argv[1]
g = torch.Generator().manual_seed(0)
with open(path, "wb") as f:  # the base, then k experts: bf16 rows, as in a checkpoint file
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    f.write(base.view(torch.int16).numpy().tobytes())
    for _ in range(k):
        f.write((base.float() + torch.randn(rows, cols, generator=g) * 0.002).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
del base

def stream(i):
    def read_rows(r0, r1, out):  # as flows/unit reads: into the stream's buffers
        with open(path, "rb") as f:
            f.seek((i * rows + r0) * cols * 2)
            f.readinto(out.view(torch.int16).numpy())
        return out
    return merge_ops.RowStream((rows, cols), torch.bfloat16, read_rows, window, f"input {i}", read_ahead=pool,
                               fills=True)

pool = ThreadPoolExecutor(1)  # as flows/unit streams: the next window of each input read ahead
cases = [("ties", {"density": 0.2}), ("dare_ties", {"density": 0.1, "rescale": "l1"})]
small = [(torch.randn(300_000, generator=g) * 0.02).to(torch.bfloat16) for _ in range(k + 1)]
for method, p in cases:  # numba's compiled kernels loaded (or compiled) first: once per process, not per merge
    merge_ops.merge_tensors(method, small[1:], small[0], seed=1, name="w", **p)

out = []
for kernels in ["fused", "torch"]:
    with mock.patch.object(merge_ops.kernels, "fused_on", lambda device: kernels == "fused"):
        for method, p in cases:
            written = []
            before = rss("VmRSS")
            open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
            merge_ops.merge_stream(method, [stream(i) for i in range(1, k + 1)], stream(0), seed=1, name="w",
                                   write=lambda block: written.append(block.shape[0]), **p)
            assert sum(written) == rows
            out.append([method, kernels, rss("VmHWM") - before])
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux)")
def test_streamed_merge_holds_windows_not_the_tensor(tmp_path):
    """A tensor of 8.4M elements x 9 inputs (151 MiB of bf16) merged 64 rows at a time: the peak
    RSS rises by two windows per input (one read ahead) and one of the output, plus the chunk
    buffers (what flows/unit reserves for a streamed tensor), not by the tensor, even for TIES and
    DARE with the L1 rescale, which read it several times."""
    from merge_ops import scratch_bytes

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    got = subprocess.run([sys.executable, "-c", _PEAK_STREAMED, str(tmp_path / "inputs.bin")], env=env,
                         check=True, capture_output=True, text=True)
    windows = 64 * 2048 * 2 * (2 * 9 + 1)  # two windows of rows of each input, one of the output
    merges = json.loads(got.stdout)
    for method, path, extra in merges:
        assert extra <= windows + scratch_bytes(8, "cpu", streamed=True), (method, path, extra / 2**20)
    assert max(extra for *_, extra in merges) > (windows + scratch_bytes(8, "cpu", streamed=True)) / 2  # not loose


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_dtype_defaults_to_base_and_can_be_overridden(dtype):
    base = torch.randn(4, 4).to(dtype)
    experts = [(base.float() + 0.1).to(torch.float32)]
    assert merge_tensors("task_arithmetic", experts, base).dtype == dtype
    assert merge_tensors("task_arithmetic", experts, base, out_dtype="bfloat16").dtype == torch.bfloat16
    assert merge_tensors("linear", [base]).dtype == dtype


def test_bf16_inputs_are_computed_in_float32():
    # 1 + 2**-9 is not representable in bf16; its float32 sum with other bf16 values is.
    a = torch.full((8,), 1.0, dtype=torch.bfloat16)
    b = torch.full((8,), 1.0078125, dtype=torch.bfloat16)  # 1 + 2**-7
    out = merge_tensors("linear", [a, b, b, b], out_dtype=torch.float32)
    assert torch.all(out == (1.0 + 3 * 1.0078125) / 4)


def test_dare_is_a_pure_function_of_seed_name_expert_position():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3000, generator=gen)
    experts = [base + torch.randn(3000, generator=gen) for _ in range(3)]
    run = lambda **kw: merge_tensors("dare_ties", experts, base, density=0.3, **kw)  # noqa: E731
    first = run(seed=1, name="layers.0.w")
    # other tensors merged first (any task order) do not change this one
    merge_tensors("dare_ties", experts, base, density=0.3, seed=1, name="layers.1.w")
    assert torch.equal(run(seed=1, name="layers.0.w"), first)
    assert not torch.equal(run(seed=2, name="layers.0.w"), first)
    assert not torch.equal(run(seed=1, name="layers.1.w"), first)


@pytest.mark.parametrize("k2", [0, 2**31 - 5, 2**32 - 5])
@pytest.mark.parametrize("start", [0, 2**31 - 20, 2**32 - 20])
def test_dare_draws_follow_the_formula_where_lanes_wrap(k2, start, kernel_path):
    """The kernels' int32 lanes wrap (j + k2) past 2**31 and 2**32 exactly as the documented formula
    does, and chunks reaching past 2**32 (the int64 path) follow it too."""
    from merge_ops.dropout import DropMask, random_u32

    k1, m, density = 0x9E3779B9, 64, 0.5
    want = [_ref_draw(k1, k2, j) for j in range(start, start + m)]
    assert random_u32((k1, k2), start, start + m).tolist() == want
    expected = [1.0 if w < int(density * 2**32) else 0.0 for w in want]
    mask = DropMask((k1, k2), density, "cpu")
    for ramp in (None, torch.arange(m, dtype=torch.int32)):
        h, t = torch.empty(m, dtype=torch.int32), torch.empty(m, dtype=torch.int32)
        assert mask.keep_into(start, start + m, torch.empty(m), h, t, ramp).tolist() == expected


_PEAK_PER_MERGE = _RSS + """
import json, sys, torch
from unittest import mock
import merge_ops, merge_ops.kernels
from merge_ops import kept_bytes, merge_tensors

n, k = 1_500_000, 8
g = torch.Generator().manual_seed(0)
base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
experts = [(base.float() + torch.randn(n, generator=g) * 0.002).to(torch.bfloat16) for _ in range(k)]
params = {"linear": {}, "task_arithmetic": {}, "ties": {"density": 0.2},
          "dare_linear": {"density": 0.1, "rescale": "l1"}, "dare_ties": {"density": 0.1, "rescale": "l1"}}
# experts that never changed this tensor: every magnitude is 0, and all of them tie at TIES's threshold
cases = [(method, p, experts) for method, p in params.items()] + [("ties", params["ties"], [base.clone()] * k)]
out = []
for path, threads in [("fused", 1), ("torch", 2)]:
    torch.set_num_threads(threads)
    with mock.patch.object(merge_ops.kernels, "fused_on", lambda device: path == "fused"):
        for method, p, inputs in cases:
            merge_tensors(method, [e[:300_000] for e in inputs], base[:300_000], seed=1, name="w", **p)
            before = rss("VmRSS")
            open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
            merged = merge_tensors(method, inputs, base, seed=1, name="w", **p)
            extra = rss("VmHWM") - before - merged.nbytes
            out.append([method, path, threads, extra, kept_bytes(method, p, k, n, "cpu")])
            del merged
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux)")
def test_scratch_bytes_bounds_what_a_merge_allocates():
    """flows/unit reserves scratch_bytes + kept_bytes per merge beside its inputs and output.
    Measured as the rise of the process's peak RSS over one merge, in a process where glibc maps
    every block over 64 KiB afresh, so that no freed memory hides an allocation."""
    from merge_ops import scratch_bytes

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    got = subprocess.run([sys.executable, "-c", _PEAK_PER_MERGE], env=env, check=True, capture_output=True, text=True)
    merges = json.loads(got.stdout)
    for method, path, threads, extra, kept in merges:
        assert extra <= scratch_bytes(8, "cpu") + kept, (method, path, threads, extra / 2**20)
    assert max(extra for *_, extra, _ in merges) > scratch_bytes(8, "cpu") / 2  # not a loose bound
    assert scratch_bytes(8, "cuda") == 0


_PEAK_WRITING_ROWS = _RSS + """
import json, os, sys, torch
import merge_ops
from merge_ops import kept_bytes, merge_tensors, output_bytes, scratch_bytes

shape, k = (12000, 2048), 4  # 24.6M elements: twelve blocks of rows
g = torch.Generator().manual_seed(0)
base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
experts = [(base.float() + torch.randn(shape, generator=g) * 0.002).to(torch.bfloat16) for _ in range(k)]
sink = open(os.devnull, "wb")
out = []
for method, p in [("task_arithmetic", {}), ("ties", {"density": 0.2}), ("dare_ties", {"density": 0.1, "rescale": "l1"})]:
    merge_tensors(method, [e[:100] for e in experts], base[:100], name="w", write=lambda rows: None, **p)
    before = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    merge_tensors(method, experts, base, name="w", write=lambda rows: sink.write(rows.view(torch.int16).numpy()), **p)
    bound = scratch_bytes(k, "cpu") + kept_bytes(method, p, k, base.numel(), "cpu") + output_bytes(shape, base.dtype, "cpu")
    out.append([method, rss("VmHWM") - before, bound])
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux)")
def test_a_merge_writing_rows_holds_one_block_of_its_output():
    """flows/unit reserves output_bytes for a CPU merge's output, one block of rows, not the
    tensor: measured as the rise of the peak RSS over a merge that writes its rows to a file."""
    from merge_ops import output_bytes

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    got = subprocess.run([sys.executable, "-c", _PEAK_WRITING_ROWS], env=env, check=True, capture_output=True, text=True)
    whole = 12000 * 2048 * 2  # the output tensor: more than any bound, so holding it would fail
    for method, extra, bound in json.loads(got.stdout):
        assert extra <= bound < whole, (method, extra / 2**20, bound / 2**20)
    assert output_bytes((12000, 2048), torch.bfloat16, "cuda") == whole  # a GPU merge comes back whole
    assert output_bytes((), torch.float32, "cpu") == 4


def test_dare_same_bits_in_a_fresh_process(tmp_path):
    code = (
        "import torch, merge_ops;"
        "g=torch.Generator().manual_seed(3); b=torch.randn(5000, generator=g);"
        "e=[b+torch.randn(5000, generator=g) for _ in range(4)];"
        "r=merge_ops.merge_tensors('dare_linear', e, b, density=0.25, seed=9, name='x', chunk_size=777);"
        f"torch.save(r, {str(tmp_path / 'r.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    g = torch.Generator().manual_seed(3)
    b = torch.randn(5000, generator=g)
    e = [b + torch.randn(5000, generator=g) for _ in range(4)]
    here = merge_tensors("dare_linear", e, b, density=0.25, seed=9, name="x")
    assert torch.equal(torch.load(tmp_path / "r.pt"), here)


def test_dare_expectation_equals_task_arithmetic():
    n = 2000
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=gen)
    experts = [base + torch.randn(n, generator=gen) for _ in range(2)]
    density = 0.4
    ta = merge_tensors("task_arithmetic", experts, base)
    seeds = 400
    samples = torch.stack([merge_tensors("dare_linear", experts, base, density=density, seed=s) for s in range(seeds)])
    # per element, each expert's term is d/p with prob p, else 0: variance d^2 (1-p)/p
    deltas = torch.stack([e - base for e in experts])
    std_err = torch.sqrt((deltas**2).sum(0) * (1 - density) / density / seeds)
    z = (samples.mean(0) - ta) / std_err
    assert z.abs().max() < 5.5  # 2000 elements: a larger z would be a >1e-4 event under correct sampling
    assert abs(z.mean().item()) < 0.15  # and no systematic bias across elements
    keep_rate = (samples != base).float().mean().item()
    assert abs(keep_rate - (1 - (1 - density) ** 2)) < 0.01


def test_dare_l1_rescale_preserves_each_task_vectors_l1_norm():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(10_000, generator=gen)
    expert = base + torch.randn(10_000, generator=gen)
    out = merge_tensors("dare_linear", [expert], base, density=0.3, rescale="l1", out_dtype=torch.float64)
    before = (expert.double() - base.double()).abs().sum()
    after = (out - base.double()).abs().sum()
    assert after.item() == pytest.approx(before.item(), rel=1e-5)
    plain = merge_tensors("dare_linear", [expert], base, density=0.3, rescale="none")
    kept = plain != base
    assert torch.allclose(plain[kept], expert[kept])


@pytest.mark.parametrize("chunk", [None, 1000, 4099])
def test_dare_l1_on_several_prepass_blocks_follows_the_formula(chunk, kernel_path):
    """Longer than the L1 pre-pass's block, not a multiple of 8, one expert that drops nothing:
    the draws the pre-pass keeps are the formula's, wherever the merge's chunks start."""
    from merge_ops import DEFAULT_CHUNK
    from merge_ops.dropout import keep_mask, stream_keys

    n, densities, weights = 2 * DEFAULT_CHUNK + 13, [0.1, 0.45, 1.0], [1.0, 0.5, 2.0]
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(n, generator=gen)
    experts = [base + torch.randn(n, generator=gen) * 0.1 for _ in densities]
    got = merge_tensors("dare_linear", experts, base, weights=weights, density=densities, rescale="l1",
                        seed=4, name="t", chunk_size=chunk, out_dtype=torch.float64)
    want = base.double().clone()
    for i, (e, d, w) in enumerate(zip(experts, densities, weights)):
        delta = e.double() - base.double()
        kept = delta * keep_mask(stream_keys(4, "t", i), 0, n, d)
        want += w * kept * (delta.abs().sum() / kept.abs().sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ALL)
def test_fused_and_torch_kernels_give_the_same_bits(method):
    """What a CPU worker and a GPU worker compute must not differ: the two implementations of the
    element loops, on a tie-heavy bf16 tensor of several chunks (TIES's bracket path, one-value
    brackets included; DARE's L1 pre-pass), with weights and a lambda that float32 rounds."""
    n = 2 * merge_ops.DEFAULT_CHUNK + 77
    gen = torch.Generator().manual_seed(12)
    base = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    experts = [(base.float() + torch.randn(n, generator=gen) * 0.002).to(torch.bfloat16) for _ in range(3)]
    params = {"ties": {"density": 0.2}, "dare_linear": {"density": 0.3, "rescale": "l1"},
              "dare_ties": {"density": 0.3, "rescale": "l1"}}.get(method, {})
    if merge_ops.METHODS[method].needs_base:
        params["lambda"] = 0.9
    kw = dict(weights=[1.0, 0.3, 1.7], seed=3, name="layers.0.w", chunk_size=100_003, out_dtype=torch.float32)
    with kernels("fused"):
        fused_bits = merge_tensors(method, experts, base, **kw, **params)
    with kernels("torch"):
        assert torch.equal(merge_tensors(method, experts, base, **kw, **params), fused_bits)


def test_kept_bytes_counts_ties_brackets_only():
    """flows/unit reserves kept_bytes for each merge: TIES's bracket candidates on a CPU merge of a
    large tensor. DARE's L1 rescale draws its mask again in the merge pass instead of keeping it
    (tracemalloc sees no numpy memory held across the passes)."""
    import tracemalloc

    from merge_ops import kept_bytes

    n = 3_000_000
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(n, generator=gen)
    experts = [base + torch.randn(n, generator=gen) for _ in range(3)]
    with kernels("fused"):
        merge_tensors("dare_linear", [e[:1000] for e in experts], base[:1000], density=0.2, rescale="l1")  # compiled first
        tracemalloc.start()
        try:
            merge_tensors("dare_linear", experts, base, density=0.2, rescale="l1")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < n / 8  # far less than one expert's draws, packed
    assert kept_bytes("dare_linear", {"rescale": "l1"}, 3, n, "cpu") == 0
    assert kept_bytes("ties", {"density": 0.2}, 3, n, "cpu") == 3 * (n // 16) * 4  # the brackets
    assert kept_bytes("ties", {"density": 0.2}, 3, n, "cuda") == kept_bytes("ties", {}, 3, 1000, "cpu") == 0


_MERGES_AFTER_WARM_UP = """
import json, sys, torch
from numba.core.dispatcher import Dispatcher
from merge_ops import fused, merge_tensors
n = 400_000
g = torch.Generator().manual_seed(5)
def merges(count, dtype):
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    experts = [(base.float() + torch.randn(n, generator=g) * 0.003).to(dtype) for _ in range(count)]
    merge_tensors("ties", experts, base, name="w", density=0.3)
    merge_tensors("dare_ties", experts, base, name="w", density=0.2, rescale="l1")
    merge_tensors("dare_linear", experts, base, name="w", density=0.2)
    merge_tensors("ties", [base + 2 ** -5, base - 2 ** -5], base, name="w", density=0.3)  # one-value brackets
def compiled():
    return {k: sum(f.stats.cache_misses.values()) for k, f in vars(fused).items() if isinstance(f, Dispatcher)}
for dtype in sys.argv[1:]:
    merges(2, getattr(torch, dtype))
after_two = compiled()
merges(3, torch.bfloat16)
json.dump([after_two, compiled()], sys.stdout)
"""


def test_warm_up_compiles_the_loops_a_merge_then_loads(tmp_path):
    """A worker image runs `python -m merge_ops.warm` at build time: afterwards a merge of as many
    experts (bf16, float32, float16) compiles nothing; one of more experts still compiles its loop."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    warm = subprocess.run([sys.executable, "-m", "merge_ops.warm", "--max-experts", "2"], env=env,
                          capture_output=True, text=True, check=True)
    assert int(re.search(r"(\d+) loop signatures compiled", warm.stdout)[1]) > 0, warm.stdout  # a fresh cache
    got = subprocess.run([sys.executable, "-c", _MERGES_AFTER_WARM_UP, "bfloat16", "float32", "float16"], env=env,
                         capture_output=True, text=True, check=True)
    after_two, after_three = json.loads(got.stdout)
    assert {"elect_mean", "l1_sums", "drop_"} <= set(after_two)  # every compiled function, counted
    assert after_two == dict.fromkeys(after_two, 0), after_two
    assert after_three["elect_mean"] == 1 and after_three["drop_"] == 0, after_three
    bad = subprocess.run([sys.executable, "-m", "merge_ops.warm", "--max-experts", "1"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--max-experts must be at least 2" in bad.stderr


# ---------------------------------------------------------------- registry and errors


def test_registry_lists_methods_with_parameters_and_descriptions():
    assert set(ALL) <= set(merge_ops.METHODS)
    ties = merge_ops.METHODS["ties"]
    assert ties.needs_base and ties.defaults()["density"] == 0.2 and ties.defaults()["lambda"] == 1.0
    assert not merge_ops.METHODS["linear"].needs_base
    assert all(m.description for m in merge_ops.METHODS.values())


@pytest.fixture
def pair():
    base = torch.zeros(3, 4)
    return [torch.ones(3, 4), torch.ones(3, 4) * 2], base


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e, b: merge_tensors("tie", e, b), "unknown merge method 'tie'.*Did you mean 'ties'"),
        (lambda e, b: merge_tensors("ties", [], b), "no experts"),
        (lambda e, b: merge_tensors("ties", [e[0], torch.ones(4, 3)], b, name="w.q"),
         r"tensor 'w.q'.*expert 1 has shape \(4, 3\), the base has \(3, 4\)"),
        (lambda e, b: merge_tensors("ties", e), "needs a base"),
        (lambda e, b: merge_tensors("ties", [e[0], e[1] * float("nan")], b), "expert 1.*NaN or Inf"),
        (lambda e, b: merge_tensors("task_arithmetic", e, b * float("inf")), "the base.*NaN or Inf"),
        (lambda e, b: merge_tensors("ties", e, b, density=0.0), r"density must be in \(0, 1\]"),
        (lambda e, b: merge_tensors("dare_ties", e, b, density=1.5), r"density must be in \(0, 1\]"),
        (lambda e, b: merge_tensors("ties", e, b, density=[0.2]), "'density'.*1 values for 2 experts"),
        (lambda e, b: merge_tensors("linear", e, weights=[1.0]), "1 weights given for 2 experts"),
        (lambda e, b: merge_tensors("ties", e, b, densty=0.3), "unknown parameter 'densty'.*Did you mean 'density'"),
        (lambda e, b: merge_tensors("linear", e, weights=[1.0, -1.0]), "sum to zero"),
        (lambda e, b: merge_tensors("dare_ties", e, b, rescale="l2"), "rescale must be"),
        (lambda e, b: merge_tensors("ties", e, b, weights=[1.0, -1.0]), "ties elects signs"),
        (lambda e, b: merge_tensors("dare_ties", e, b, weights=[-0.5, 1.0]), "dare_ties elects signs"),
        (lambda e, b: merge_tensors("ties", e, b, normalize="false"), "'normalize'.*true or false"),
        (lambda e, b: merge_tensors("task_arithmetic", e, b, weights=[1.0, float("nan")]), "weight of expert 1"),
        (lambda e, b: merge_tensors("linear", e, weights=["1", 1.0]), "weight of expert 0 must be a finite number"),
        (lambda e, b: merge_tensors("linear", e, weights=[1.0, True]), "weight of expert 1 must be a finite number"),
        (lambda e, b: merge_tensors("linear", e, out_dtype="int8"), "out_dtype"),
        (lambda e, b: merge_tensors("ties", [e[0], e[1] * float("nan")], b, labels=["a/", "b/", "base/"]),
         "^b/ contains NaN"),
        (lambda e, b: merge_tensors("ties", [e[0], torch.ones(4, 3)], b, labels=["a/", "b/", "base/"]),
         r"b/ has shape \(4, 3\), base/ has \(3, 4\)"),
        (lambda e, b: merge_tensors("linear", [e[0], torch.ones(4, 3)], b, labels=["a/", "b/", "base/"]),
         r"b/ has shape \(4, 3\), a/ has \(3, 4\)"),
        (lambda e, b: merge_tensors("ties", e, b, labels=["a/", "b/"]), "2 labels given for 2 experts and a base"),
        (lambda e, b: merge_tensors("linear", [e[0].to(torch.float8_e4m3fn), e[1]]), "expert 0 has dtype.*float8"),
        (lambda e, b: merge_tensors("linear", [e[0], e[1].to(torch.int32)]), "expert 1 has dtype torch.int32"),
    ],
)
def test_errors_name_what_is_wrong(pair, call, message):
    experts, base = pair
    with pytest.raises(ValueError, match=message):
        call(experts, base)


@pytest.mark.parametrize("method, params", [("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 0.3}),
                                            ("dare_ties", {"density": 0.3}), ("dare_linear", {"density": 0.3})])
def test_an_empty_tensor_merges_to_an_empty_tensor(method, params):
    out = merge_tensors(method, [torch.zeros(0, 4), torch.ones(0, 4)], torch.zeros(0, 4), **params)
    assert out.shape == (0, 4)


def test_float_density_rounding_keeps_round_of_density_times_n():
    delta = torch.arange(1, 101, dtype=torch.float32)  # distinct magnitudes 1..100
    base = torch.zeros(100)
    out = merge_tensors("ties", [delta], base, density=0.29)
    assert int((out != 0).sum()) == 29 == math.floor(0.29 * 100 + 0.5)
