"""The GPU path gives the CPU's answer: merge kernels and whole layer-unit merges on CUDA.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine:
`python -m pytest tests/test_gpu.py` (needs torch, safetensors, boto3, pyyaml, hypothesis, pytest;
not Prefect, DuckDB or moto, so `--noconftest` runs it in a bare CUDA image).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_merge_ops import SETTINGS, assert_close, merge_case, reference

from benchmarks.checkpoints import Shape, generate
from flows.plan import make_plan
from flows.recipe import parse_recipe
from flows.unit import UnitJob, run_unit
from merge_ops import DEFAULT_CHUNK, GPU_CHUNK, merge_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PARAMS = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.7},
    "ties": {"density": 0.2},
    "dare_linear": {"density": 0.3},
    "dare_ties": {"density": 0.3},
}


def _params(method: str, density: float) -> dict:
    return {k: density if k == "density" else v for k, v in PARAMS[method].items()}


def _cases(method: str):
    """Integer-valued inputs make the sign election tie exactly; DARE's 1/density rescale then
    rounds, and a tie falls either way (in the float64 reference too), so DARE gets continuous
    values only, as in test_merge_ops."""
    if method.startswith("dare"):
        return merge_case()
    return st.one_of(merge_case(), merge_case(integer_valued=True))


@SETTINGS
@given(st.sampled_from(sorted(PARAMS)).flatmap(lambda m: st.tuples(st.just(m), _cases(m))), st.integers(0, 5))
def test_cuda_merges_match_the_slow_reference(method_case, seed):
    method, (experts, base, weights, density) = method_case
    got = merge_tensors(method, [e.cuda() for e in experts], base.cuda(), weights=weights, seed=seed,
                        name="w", out_dtype=torch.float32, **_params(method, density))
    assert got.is_cuda
    want = reference(method, experts, base if method != "linear" else None, weights, seed=seed, name="w",
                     **_params(method, density))
    assert_close(got.cpu(), want)


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_cuda_matches_cpu_on_a_tensor_of_several_gpu_chunks(method):
    """Two and a bit GPU chunks of bf16 (tie-heavy magnitudes, the TIES bracket path, DARE draws
    across chunk edges): the CPU merges it in DEFAULT_CHUNK pieces, the GPU in GPU_CHUNK ones."""
    n = 2 * GPU_CHUNK + 12_345
    assert GPU_CHUNK > DEFAULT_CHUNK
    gen = torch.Generator().manual_seed(3)
    base = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    experts = [(base.float() + torch.randn(n, generator=gen) * 0.002 * (1 + i)).to(torch.bfloat16)
               for i in range(3)]
    kw = dict(weights=[1.0, 0.5, 2.0], seed=9, name="model.layers.0.mlp.up_proj.weight",
              out_dtype=torch.float32, **PARAMS[method])
    on_cpu = merge_tensors(method, experts, base, **kw)
    on_gpu = merge_tensors(method, [e.cuda() for e in experts], base.cuda(), **kw).cpu()
    # float32 sums may round differently on the two devices; a different keep/drop decision
    # anywhere moves that entry by a whole delta (~1e-3), far outside this tolerance
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-5, atol=1e-7)
    assert torch.equal(on_gpu != base.float(), on_cpu != base.float())


SHAPE = Shape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=512)


def _tiny_zoo(root):
    return generate(root / "zoo", SHAPE, experts=3, seed=1, log=lambda *_: None)


def _merge_units(base, experts, method: str, device: str, staging) -> dict[str, torch.Tensor]:
    """Every unit of the recipe through run_unit, as the flow's tasks run them; the shards' tensors."""
    recipe = yaml.safe_dump({
        "merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts],
        "parameters": PARAMS[method], "out_dtype": "float32", "device": device, "output": str(staging / "out"),
    })
    plan = make_plan(parse_recipe(recipe, source=f"{method}-{device}.yaml"))
    assert plan.device == device
    merged = {}
    for unit in plan.units:
        info = run_unit(UnitJob.from_plan(plan, unit, str(staging)))
        merged.update(load_file(info["uri"].removeprefix("file://")))
    return merged


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_unit_merges_on_cuda_write_the_shards_the_cpu_writes(tmp_path, method):
    base, experts = _tiny_zoo(tmp_path)
    on_gpu = _merge_units(base, experts, method, "cuda", tmp_path / "gpu")
    on_cpu = _merge_units(base, experts, method, "cpu", tmp_path / "cpu")
    assert on_gpu.keys() == on_cpu.keys() and len(on_cpu) == len(SHAPE.tensors())
    for name, want in on_cpu.items():
        assert on_gpu[name].dtype == torch.float32
        torch.testing.assert_close(on_gpu[name], want, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_streamed_unit_merges_on_cuda_write_the_shards_the_cpu_writes(tmp_path, method, monkeypatch):
    """A budget too small for the embeddings whole: on CUDA they stream, window by window (TIES's
    counting passes on the device), and match the CPU's whole-tensor merge."""
    base, experts = _tiny_zoo(tmp_path)
    on_cpu = _merge_units(base, experts, method, "cpu", tmp_path / "cpu")
    import flows.unit

    monkeypatch.setenv("MERGELINE_MEMORY_BUDGET_MB", "0.3")  # embeddings: 512 x 64 x (4 bf16 + 1 fp32) = 384 KiB
    streamed = []
    merge_streamed = flows.unit._merge_streamed
    monkeypatch.setattr(flows.unit, "_merge_streamed", lambda job, name, *a: streamed.append(name) or
                        merge_streamed(job, name, *a))
    on_gpu = _merge_units(base, experts, method, "cuda", tmp_path / "gpu")
    assert sorted(streamed) == ["lm_head.weight", "model.embed_tokens.weight"]
    for name, want in on_cpu.items():
        torch.testing.assert_close(on_gpu[name], want, rtol=1e-5, atol=1e-7, msg=name)
