"""The method registry: names, parameters with defaults, and their validation.

Parameters are validated here, once, before any tensor is touched, so a bad recipe fails with
a message that names the parameter instead of a shape error deep inside torch.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    doc: str
    per_model: bool = False  # may be given as one value per expert (like mergekit's `density`)
    kind: type | None = None  # what a value must be: None means the default's type (bool or number)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    needs_base: bool
    params: tuple[Param, ...]
    divides_by_weight_sum: bool  # with normalize: true, weights summing to zero cannot be merged
    elects_signs: bool  # TIES-style sign election: a negative weight has no agreed meaning
    # prepare(experts, base, weights, params, seed, name) -> kernel(start, stop) -> float32 chunk
    prepare: Callable = field(repr=False)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


METHODS: dict[str, Method] = {}


def register(name: str, description: str, *, needs_base: bool, params: tuple[Param, ...] = (),
             divides_by_weight_sum: bool = False, elects_signs: bool = False):
    def wrap(prepare: Callable) -> Callable:
        METHODS[name] = Method(name, description, needs_base, params, divides_by_weight_sum, elects_signs, prepare)
        return prepare

    return wrap


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(
            f"unknown merge method {name!r}.{_suggest(name, METHODS)} Known methods: {', '.join(sorted(METHODS))}."
        )
    return METHODS[name]


def resolve_params(method: Method, given: dict[str, Any], n_experts: int) -> dict[str, Any]:
    """Defaults filled in, unknown names refused, per-model values expanded to one per expert."""
    known = {p.name: p for p in method.params}
    for key in given:
        if key not in known:
            accepted = ", ".join(known) or "none"
            raise ValueError(
                f"unknown parameter {key!r} for method {method.name!r}.{_suggest(key, known)} "
                f"Accepted parameters: {accepted}."
            )
    resolved = method.defaults() | dict(given)
    for p in method.params:
        value = resolved[p.name]
        if p.per_model:
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n_experts
            if len(values) != n_experts:
                raise ValueError(
                    f"parameter {p.name!r} of method {method.name!r} has {len(values)} values "
                    f"for {n_experts} experts"
                )
            resolved[p.name] = values
        for i, v in enumerate(resolved[p.name] if p.per_model else [value]):
            _check_kind(p, v, method.name, f" for expert {i}" if p.per_model else "")
    if "density" in resolved:
        for i, d in enumerate(resolved["density"]):
            if not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
                raise ValueError(
                    f"density must be in (0, 1], got {d!r} for expert {i} (method {method.name!r})"
                )
    if "rescale" in resolved:
        resolved["rescale"] = _rescale_mode(resolved["rescale"])
    return resolved


def _check_kind(p: Param, value: Any, method: str, where: str) -> None:
    kind = p.kind or type(p.default)
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"parameter {p.name!r} of method {method!r} must be true or false, got {value!r}{where}")
    if kind in (int, float) and not is_number(value):
        raise ValueError(f"parameter {p.name!r} of method {method!r} must be a finite number, got {value!r}{where}")


def is_number(value: Any) -> bool:
    """A real, finite number given as one (YAML's true, 'big', null and .nan are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_weights(method: Method, weights: Sequence[Any], params: dict[str, Any]) -> None:
    """Weights are finite numbers; not negative where signs are elected; where the method divides
    by their sum, it is not zero."""
    for i, w in enumerate(weights):
        if not is_number(w):
            raise ValueError(f"weight of expert {i} must be a finite number, got {w!r}")
    if method.elects_signs and any(w < 0 for w in weights):
        raise ValueError(f"weights {list(weights)}: {method.name} elects signs, and a negative weight has no agreed "
                         "meaning there (mergekit divides by the signed sum of the agreeing weights, which can flip "
                         "the update); subtract a task vector with task_arithmetic instead")
    if method.divides_by_weight_sum and params.get("normalize") and weights and sums_to_zero(weights):
        raise ValueError(f"weights {list(weights)} sum to zero; {method.name} with normalize: true divides "
                         "by their sum (set normalize: false, or change a weight)")


def sums_to_zero(weights: Sequence[float]) -> bool:
    """Zero, or a float residue of cancelling terms (0.1 + 0.2 - 0.3): dividing by it is not a merge."""
    return abs(math.fsum(weights)) <= 1e-9 * math.fsum(abs(w) for w in weights)


def _rescale_mode(value: Any) -> str:
    """mergekit spells DARE's rescale as a bool; we also accept 'l1' (match the L1 norm)."""
    mode = {True: "density", False: "none"}.get(value, value)
    if mode not in ("density", "l1", "none"):
        raise ValueError(f"rescale must be true, false, 'density', 'l1' or 'none', got {value!r}")
    return mode
