"""Merge recipes: mergekit's YAML format for the keys we share, plus mergeline's own keys.

Everything is checked here, before any checkpoint is opened: unknown keys, mergekit features we
do not support, method parameters (through merge_ops' own validation). A recipe that loads is a
recipe whose merge can start.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merge_ops import get_method
from merge_ops.merge import DTYPE_ALIASES
from merge_ops.registry import check_weights, resolve_params
from storage.uri import normalize

MERGEKIT_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
MERGELINE_KEYS = {"name", "output", "seed", "device", "evaluate", "models_from"}
UNSUPPORTED = {
    "slices": "layer slicing (frankenmerges)",
    "modules": "per-module configurations",
    "tokenizer_source": "tokenizer merging (mergeline copies the base's tokenizer: 'tokenizer_source: base' is accepted)",
    "tokenizer": "tokenizer merging (mergeline copies the base's tokenizer)",
    "chat_template": "chat template selection",
}
DTYPES = {"float32", "float16", "bfloat16"}
DEVICES = {"auto", "cpu", "cuda"}


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class ModelEntry:
    uri: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str
    base: str | None
    models: tuple[ModelEntry, ...]
    parameters: dict[str, Any]      # method parameters, resolved: defaults filled, per-model lists expanded
    weights: tuple[float, ...]
    output: str | None
    out_dtype: str | None
    seed: int
    device: str
    evaluate: dict | None          # {'suite': URI, 'experts': {name: URI}} after the merge, or None
    models_from: dict | None
    text: str
    source: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def inputs(self) -> list[str]:
        return [m.uri for m in self.models]

    def with_models(self, uris: list[str]) -> Recipe:
        """The same recipe over concrete experts (for `models_from` selections)."""
        data = yaml.safe_load(self.text)
        data.pop("models_from", None)
        data["models"] = [{"model": u} for u in uris]
        return parse_recipe(yaml.safe_dump(data, sort_keys=False), source=self.source)


def load_recipe(path: str | Path, *, output: str | None = None) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    return parse_recipe(text, source=str(path), output=output)


def parse_recipe(text: str, *, source: str = "<recipe>", output: str | None = None) -> Recipe:
    def fail(msg: str) -> RecipeError:
        return RecipeError(f"{source}: {msg}")

    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise fail(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise fail("a recipe is a YAML mapping with at least merge_method and models")
    if data.get("tokenizer_source") == "base" and data.get("base_model"):
        del data["tokenizer_source"]  # what mergeline does anyway: the base's tokenizer files are copied
    for key in data:
        if key in UNSUPPORTED:
            raise fail(f"'{key}' is a mergekit feature mergeline does not support ({UNSUPPORTED[key]})")
        if key not in MERGEKIT_KEYS | MERGELINE_KEYS:
            raise fail(f"unknown key '{key}'; recipe keys are: {', '.join(sorted(MERGEKIT_KEYS | MERGELINE_KEYS))}")

    method_name = data.get("merge_method")
    if not method_name:
        raise fail("'merge_method' is required")
    try:
        method = get_method(method_name)
    except ValueError as exc:
        raise fail(str(exc)) from None

    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise fail("'base_model' must be a URI string (s3://bucket/prefix or a local path)")
    if method.needs_base and not base:
        raise fail(f"method '{method_name}' needs 'base_model'")

    models = _models(data, fail)
    if base and method.needs_base:  # mergekit lists the base among the models; its task vector is zero
        models = [m for m in models if not _same_uri(m.uri, base, fail)]
    if not models and not data.get("models_from"):
        raise fail("'models' lists no experts to merge")

    top = data.get("parameters") or {}
    if not isinstance(top, dict):
        raise fail("'parameters' must be a mapping")
    _no_filters(top, "parameters", fail)
    params, weights = _method_parameters(method, top, models, fail)

    out_dtype = data.get("out_dtype") or data.get("dtype")
    out_dtype = DTYPE_ALIASES.get(out_dtype, out_dtype) if isinstance(out_dtype, str) else out_dtype
    if out_dtype is not None and out_dtype not in DTYPES:
        raise fail(f"dtype '{out_dtype}' not supported; use one of {', '.join(sorted(DTYPES))}")
    device = data.get("device", "auto")
    if device not in DEVICES:
        raise fail(f"device '{device}' not supported; use one of {', '.join(sorted(DEVICES))}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise fail(f"'seed' must be an integer, got {seed!r}")
    models_from = _models_from(data, models, fail)
    evaluate = _evaluate(data.get("evaluate"), fail)
    name = data.get("name") or Path(source).stem
    return Recipe(
        name=str(name), method=method_name, base=base, models=tuple(models), parameters=params,
        weights=tuple(weights), output=output or data.get("output"), out_dtype=out_dtype, seed=seed,
        device=device, evaluate=evaluate, models_from=models_from, text=text, source=source,
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error instead of last-wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _same_uri(a: str, b: str, fail) -> bool:
    try:
        return normalize(a) == normalize(b)
    except ValueError as exc:
        raise fail(str(exc)) from None


def _models(data: dict, fail) -> list[ModelEntry]:
    raw = data.get("models") or []
    if not isinstance(raw, list):
        raise fail("'models' must be a list of {model: URI, parameters: {...}}")
    out = []
    for i, entry in enumerate(raw):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise fail(f"models[{i}] needs 'model: URI'")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise fail(f"models[{i}] has unknown keys {sorted(extra)}; allowed: model, parameters")
        if "+" in entry["model"]:
            raise fail(f"models[{i}]: 'model+lora' references are a mergekit feature mergeline does not support")
        params = entry.get("parameters") or {}
        _no_filters(params, f"models[{i}].parameters", fail)
        out.append(ModelEntry(entry["model"], dict(params)))
    return out


MODELS_FROM_KEYS = {"uri", "pattern", "tags", "latest"}


def _models_from(data: dict, models: list[ModelEntry], fail) -> dict | None:
    """Validate a dynamic selection; returns it normalised ({uri, pattern, tags, latest}) or None.

    `uri` is the experts prefix, `pattern` a glob on expert names (default '*'), `tags` the tags an
    expert's completion marker must all carry, `latest` (only true) the current version of each.
    """
    raw = data.get("models_from")
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"uri": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("uri"), str) or not raw["uri"].strip():
        raise fail("'models_from' must be a prefix URI or a mapping with 'uri' (and optional 'pattern', 'tags')")
    extra = set(raw) - MODELS_FROM_KEYS
    if extra:
        raise fail(f"models_from has unknown keys {sorted(extra)}; allowed: {', '.join(sorted(MODELS_FROM_KEYS))}")
    if models:
        raise fail("give either 'models' (a fixed list) or 'models_from' (a selection), not both")
    pattern = raw.get("pattern", "*")
    if not isinstance(pattern, str) or not pattern:
        raise fail("models_from.pattern must be a glob on expert names, e.g. 'math-*'")
    tags = raw.get("tags") or []
    tags = [tags] if isinstance(tags, str) else tags
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise fail("models_from.tags must be a tag or a list of tags")
    if raw.get("latest", True) is not True:
        raise fail("models_from.latest can only be true: a selection merges the current version of each expert; "
                   "list experts under 'models' to pin them")
    return {"uri": raw["uri"].strip(), "pattern": pattern, "tags": sorted(set(tags)), "latest": True}


def _evaluate(value, fail) -> dict | None:
    """`evaluate: SUITE_URI` or `evaluate: {suite: URI, experts: {name: URI}}`."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"suite": value}
    if not isinstance(value, dict) or not isinstance(value.get("suite"), str):
        raise fail("'evaluate' must be a suite URI or a mapping with 'suite' (and optional 'experts')")
    extra = set(value) - {"suite", "experts"}
    if extra:
        raise fail(f"evaluate has unknown keys {sorted(extra)}; allowed: suite, experts")
    experts = value.get("experts") or {}
    if not isinstance(experts, dict) or not all(isinstance(v, str) for v in experts.values()):
        raise fail("evaluate.experts maps each expert name in the suite to its URI")
    return {"suite": value["suite"], "experts": dict(experts)}


def _no_filters(params: dict, where: str, fail) -> None:
    for key, value in params.items():
        if isinstance(value, (list, dict)):
            raise fail(
                f"{where}.{key}: per-layer gradients and filters are a mergekit feature mergeline does not "
                "support; give a single number"
            )


def _method_parameters(method, top: dict, models: list[ModelEntry], fail) -> tuple[dict, list[float]]:
    """Top-level values are defaults for every model; per-model values override them."""
    weights = [m.parameters.get("weight", top.get("weight", 1.0)) for m in models]
    per_model = {p.name for p in method.params if p.per_model}
    given: dict[str, Any] = {k: v for k, v in top.items() if k != "weight"}
    for m in models:
        for key in m.parameters:
            if key != "weight" and key not in per_model:
                known = ", ".join(["weight", *sorted(per_model)])
                raise fail(f"per-model parameter '{key}' is not accepted by '{method.name}' (per-model: {known})")
    for key in per_model:
        if any(key in m.parameters for m in models):
            default = top.get(key, method.defaults()[key])
            given[key] = [m.parameters.get(key, default) for m in models]
    try:
        params = resolve_params(method, given, max(1, len(models)))
        check_weights(method, weights, params)
    except ValueError as exc:
        raise fail(str(exc)) from None
    return params, [float(w) for w in weights]


def recipe_summary(recipe: Recipe) -> dict:
    """A JSON-able description for provenance records."""
    return {
        "name": recipe.name, "merge_method": recipe.method, "base_model": recipe.base,
        "models": [{"model": m.uri, "parameters": m.parameters} for m in recipe.models],
        "parameters": json.loads(json.dumps(recipe.parameters)), "weights": list(recipe.weights),
        "out_dtype": recipe.out_dtype, "seed": recipe.seed, "digest": recipe.digest,
    }
