"""The plan: every input opened and validated from headers alone, tensors grouped into layer units.

A unit is what one Prefect task merges and writes as one shard: all tensors under the first
numbered module (`model.layers.7.*`, `transformer.h.7.*`), or, for tensors outside numbered
blocks, their own module (`model.embed_tokens`, `model.norm`, `lm_head`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from merge_ops import MERGEABLE_DTYPES, METHODS, mergeable_names
from storage import (
    Checkpoint,
    CheckpointError,
    ReadCache,
    check_compatible,
    check_output,
    open_checkpoint,
    read_provenance,
    validate_output_uri,
)

from .recipe import Recipe
from .selection import resolve_recipe


class PlanError(ValueError):
    """Inputs that cannot be merged; lists every problem found."""


@dataclass(frozen=True)
class Unit:
    name: str
    shard: str
    tensors: tuple[str, ...]
    bytes_in: int


@dataclass
class Plan:
    recipe: Recipe
    output: str
    base: Checkpoint | None
    experts: list[Checkpoint]
    units: list[Unit]
    out_dtypes: dict[str, torch.dtype]
    notes: list[str]
    device: str

    @property
    def reference(self) -> Checkpoint:
        return self.base or self.experts[0]

    @property
    def inputs(self) -> list[Checkpoint]:
        return [*self.experts, *([self.base] if self.base else [])]

    @property
    def dtype(self) -> torch.dtype:
        """The model's output dtype for config.json: the recipe's, else the most common one."""
        counts: dict[torch.dtype, int] = {}
        for name, dt in self.out_dtypes.items():
            counts[dt] = counts.get(dt, 0) + self.reference.tensors[name].numel
        return max(counts, key=counts.get)

    def specs(self, unit: Unit) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(n, self.out_dtypes[n], self.reference.tensors[n].shape) for n in unit.tensors]


def unit_of(tensor_name: str) -> str:
    parts = tensor_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or tensor_name


def resolve_device(wanted: str) -> str:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise PlanError("recipe asks for device: cuda but no CUDA device is available here")
    return "cuda" if wanted in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def make_plan(recipe: Recipe, *, replace: bool = False) -> Plan:
    """The merge's units, after every check that can fail before work: inputs readable and
    compatible, the output free for this recipe (see check_replacing), evaluation possible."""
    recipe = resolve_recipe(recipe)  # `models_from`: the experts it selects now, by concrete URI
    if not recipe.output:
        raise PlanError(f"{recipe.source}: no output URI; set 'output:' in the recipe or pass --output")
    output = validate_output_uri(recipe.output)
    if recipe.evaluate:
        _check_evaluation(recipe)
    uris = ([recipe.base] if recipe.base else []) + recipe.inputs
    opened, errors = _open_all(uris)
    if errors:
        raise PlanError("cannot read the inputs:\n  " + "\n  ".join(errors))
    base = opened[recipe.base] if recipe.base else None
    experts = [opened[u] for u in recipe.inputs]
    try:
        notes = check_compatible(([base] if base else []) + experts)
        check_output(output, [c.uri for c in opened.values()])
        check_replacing(output, recipe.name, replace)
    except CheckpointError as exc:
        raise PlanError(str(exc)) from None
    _check_dtypes(([base] if base else []) + experts)
    reference = base or experts[0]
    dtype_source = base if base and METHODS[recipe.method].needs_base else experts[0]  # linear ignores the base
    out_dtypes = {
        name: getattr(torch, recipe.out_dtype) if recipe.out_dtype else dtype_source.tensors[name].torch_dtype
        for name in reference.tensors
    }
    groups: dict[str, list[str]] = {}
    for name in reference.tensors:
        groups.setdefault(unit_of(name), []).append(name)
    inputs = experts + ([base] if base else [])
    units = []
    for i, (unit_name, names) in enumerate(groups.items()):
        bytes_in = sum(c.tensors[n].nbytes for c in inputs for n in names)
        units.append(
            Unit(
                name=unit_name,
                shard=f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors",
                tensors=tuple(names),
                bytes_in=bytes_in,
            )
        )
    notes += _tokenizer_note(reference, experts)
    return Plan(recipe, output, base, experts, units, out_dtypes, notes, resolve_device(recipe.device))


def _tokenizer_note(reference: Checkpoint, experts: list[Checkpoint]) -> list[str]:
    """The output's small files are the reference's (the base, else the first expert): say so
    when it has no tokenizer and an expert does, or the published model has none."""
    def tokenizer(c: Checkpoint) -> list[str]:
        return [n for n in c.extra_files if n.startswith("tokenizer") or n.endswith((".model", ".tiktoken"))]

    if tokenizer(reference):
        return []
    having = next((e for e in experts if tokenizer(e)), None)
    if having is None:
        return []
    return [f"{reference.uri} has no tokenizer files, so the output will have none (its small files come "
            f"from there); {having.uri} has {', '.join(tokenizer(having))}: copy them in, or add them to the base"]


def _check_dtypes(inputs: list[Checkpoint]) -> None:
    """Tensors the kernels cannot merge (integers, bools, float8 without its scales), refused from
    the headers: otherwise the merge fails at their unit, after the others have run."""
    bad = [f"{c.uri}: tensor {name!r} is {t.torch_dtype}".replace("torch.", "")
           for c in inputs for name, t in c.tensors.items() if t.torch_dtype not in MERGEABLE_DTYPES]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise PlanError(f"only {mergeable_names()} tensors are merged:\n  " + "\n  ".join(bad[:5]) + more)


def check_replacing(output: str, recipe_name: str, replace: bool) -> None:
    """A recipe replaces its own earlier model; another recipe's only when told to (--replace):
    a one-off merge pointed at a production output would otherwise replace that model."""
    prior = None if replace else read_provenance(output)
    name = ((prior or {}).get("recipe") or {}).get("name")
    if name is not None and name != recipe_name:
        when = f", published {prior['published_at'][:19]}" if prior.get("published_at") else ""
        raise PlanError(f"output {output} holds the model of recipe {name!r}{when}; this recipe is "
                        f"{recipe_name!r}. Pass --replace to replace it, or choose another output")


def _check_evaluation(recipe: Recipe) -> None:
    """What the evaluation after the merge needs, checked before it: otherwise the model is
    published, the run recorded as succeeded, and only then does the evaluation fail."""
    from evaluation import HELD_OUT, load_suite

    where = f"{recipe.source}: evaluate"
    try:
        suite = load_suite(recipe.evaluate["suite"])
    except (OSError, ValueError) as exc:
        raise PlanError(f"{where}: {exc}") from None
    if suite.split(HELD_OUT) and not recipe.base:
        raise PlanError(f"{where}: suite {suite.name} has held-out tasks, which are normalised by the base "
                        "model; set base_model")
    unknown = sorted(set(recipe.evaluate["experts"]) - set(suite.experts()))
    if unknown:
        raise PlanError(f"{where}: suite {suite.name} has no tasks for expert(s) {', '.join(unknown)}; its experts "
                        f"are {', '.join(sorted(suite.experts()))}")
    for name, uri in recipe.evaluate["experts"].items():
        try:
            open_checkpoint(uri)
        except (CheckpointError, OSError) as exc:
            raise PlanError(f"{where}: expert {name}: {exc}") from None


def _open_all(uris: list[str]) -> tuple[dict[str, Checkpoint], list[str]]:
    """The inputs, opened with the read cache if MERGELINE_CACHE_DIR sets one: then every byte
    range of an S3 input is downloaded once, for this merge's passes and for later runs."""
    opened, errors = {}, []
    cache = ReadCache.from_env()
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {u: pool.submit(open_checkpoint, u, cache=cache) for u in dict.fromkeys(uris)}
    for uri, fut in futures.items():
        try:
            opened[uri] = fut.result()
        except (CheckpointError, FileNotFoundError) as exc:
            errors.append(f"{uri}: {exc}")
    return opened, errors
