"""One merge per method, written twice: a mergeline recipe and the mergekit config that computes
the same thing. They differ only where the two tools' defaults or spellings differ:

- dare_ties, dare_linear: mergekit's `rescale: true` matches each task vector's L1 norm after the
  drop; mergeline spells that `rescale: l1` (its `true` is the paper's 1/density).
- ties, dare_ties: `normalize: true` (the disjoint mean) is written out for both; mergekit's
  default for dare_ties is false.
- mergeline's own keys (name, seed) are left out of mergekit's config; mergekit gets --random-seed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
DETERMINISTIC = ("linear", "task_arithmetic", "ties")
SEED = 0

# per method: top-level parameters (shared by both tools), per-model parameters, tool-specific overrides
SPECS: dict[str, dict] = {
    "linear": {"uses_base": False, "model": {"weight": 1.0}, "top": {}, "mergeline": {}, "mergekit": {}},
    "task_arithmetic": {"uses_base": True, "model": {"weight": 1.0}, "top": {}, "mergeline": {}, "mergekit": {}},
    "ties": {"uses_base": True, "model": {"weight": 1.0, "density": 0.2}, "top": {"normalize": True},
             "mergeline": {}, "mergekit": {}},
    "dare_ties": {"uses_base": True, "model": {"weight": 1.0, "density": 0.1}, "top": {"normalize": True},
                  "mergeline": {"rescale": "l1"}, "mergekit": {"rescale": True}},
    "dare_linear": {"uses_base": True, "model": {"weight": 1.0, "density": 0.1}, "top": {},
                    "mergeline": {"rescale": "l1"}, "mergekit": {"rescale": True}},
}


def _config(method: str, base: Path, experts: list[Path], tool: str, arith_dtype: str = "bfloat16") -> dict:
    spec = SPECS[method]
    cfg: dict = {}
    if tool == "mergeline":
        cfg["name"] = f"bench-{method}"
    cfg["merge_method"] = method
    if spec["uses_base"]:
        cfg["base_model"] = str(base)
    cfg["models"] = [{"model": str(e), "parameters": dict(spec["model"])} for e in experts]
    params = {**spec["top"], **spec[tool]}
    if params:
        cfg["parameters"] = params
    if tool == "mergeline":
        cfg["dtype"] = "bfloat16"
        cfg["seed"] = SEED
    else:
        cfg["dtype"] = arith_dtype      # mergekit: the dtype it loads and computes in
        cfg["out_dtype"] = "bfloat16"
    return cfg


def write_configs(method: str, base: Path, experts: list[Path], where: Path) -> dict[str, Path]:
    """{'mergeline': recipe.yaml, 'mergekit': config.yml, 'mergekit_fp32': config computing in float32}."""
    where.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, tool, dt in (("mergeline", "mergeline", None), ("mergekit", "mergekit", "bfloat16"),
                          ("mergekit_fp32", "mergekit", "float32")):
        path = where / f"{method}.{key}.yaml"
        path.write_text(yaml.safe_dump(_config(method, base, experts, tool, dt or "bfloat16"), sort_keys=False))
        out[key] = path
    return out
