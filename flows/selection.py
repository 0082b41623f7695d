"""Landed experts and the recipes that select them.

The landing convention (README, "How an expert lands"): an expert is a folder directly under an
experts prefix, `s3://BUCKET/experts/<name>/` or a local `experts/<name>/`, in Hugging Face layout
(config.json and model.safetensors, or model.safetensors.index.json + shards). It is *complete*
once the completion marker storage.COMPLETE_MARKER (`_MERGELINE_COMPLETE`, the marker mergeline
writes last on its own outputs) is present, uploaded after everything else. The marker may be
empty, or JSON: `files` ({name: size}, what mergeline writes; every listed file must then be
there at that size, and no weight file may be missing from it) and `tags` (a list of strings that
`models_from.tags` selects on). Until then the folder is *pending* and nothing picks it up.

A recipe selects experts with `models_from: {uri: PREFIX, pattern: GLOB, tags: [..]}`: every
complete expert under PREFIX whose name matches the glob and whose marker carries all the tags,
in name order, at its current (latest) version. `resolve_recipe` turns that into a concrete
recipe (Recipe.with_models) whose text, and so its run record, names each expert it used.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import storage
from storage import s3
from storage.errors import CheckpointError, StorageError
from storage.reader import CONFIG_NAME, INDEX_NAME, SINGLE_NAME
from storage.uri import FileIdentity, is_s3, join, list_dir, listing_identities, normalize, read_into, stat

from .recipe import Recipe, RecipeError, parse_recipe

LANDING_MARKER = storage.COMPLETE_MARKER
RECIPE_SUFFIXES = (".yaml", ".yml")
MAX_SMALL = 1 << 20


class SelectionError(RecipeError):
    """A recipe's `models_from` selects nothing that can be merged."""


@dataclass(frozen=True)
class LandedExpert:
    """A complete expert folder, as listed (no safetensors header read yet)."""

    name: str
    uri: str
    tags: tuple[str, ...]
    fingerprint: str           # digest of the listing (names, sizes, ETags): changes when any file does
    files: tuple[str, ...]


@dataclass
class ExpertScan:
    prefix: str
    complete: dict[str, LandedExpert] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)   # name -> why it is not (yet) complete


# -- reading small objects -------------------------------------------------------------------------


def read_small(uri_or_ident: str | FileIdentity) -> bytes:
    """A small whole file (recipe, marker, index), local or S3, read through storage."""
    ident = uri_or_ident if isinstance(uri_or_ident, FileIdentity) else stat(uri_or_ident)
    if ident.size > MAX_SMALL:
        raise CheckpointError(f"{ident.uri}: {ident.size} bytes is too large here (limit {MAX_SMALL})")
    buf = bytearray(ident.size)
    if ident.size:
        read_into(ident, 0, memoryview(buf))
    return bytes(buf)


# -- scanning an experts prefix --------------------------------------------------------------------


def _folders(prefix: str) -> dict[str, set[str]]:
    """Folders directly under prefix -> the names of the files directly inside each."""
    out: dict[str, set[str]] = {}
    if is_s3(prefix):
        bucket, key = s3.split_s3_uri(prefix)
        if not key.strip("/"):
            raise CheckpointError(f"{prefix}: watch a prefix inside the bucket (s3://{bucket}/experts), not its root")
        base = key.strip("/") + "/"
        for k in s3.list_keys(bucket, key):
            parts = k[len(base):].split("/")
            if len(parts) >= 2 and parts[0]:
                files = out.setdefault(parts[0], set())
                if len(parts) == 2 and parts[1]:
                    files.add(parts[1])
        return out
    try:
        with os.scandir(prefix) as it:
            for entry in it:
                if entry.is_dir():
                    out[entry.name] = set(list_dir(entry.path))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return out


def scan_experts(prefix: str) -> ExpertScan:
    """Every folder under the prefix, sorted into complete experts and pending ones (with the reason)."""
    prefix = normalize(prefix)
    scan = ExpertScan(prefix)
    for name, files in sorted(_folders(prefix).items()):
        if name.startswith((".", "_")):     # staging areas (.mergeline-staging) and private folders
            continue
        if LANDING_MARKER not in files:
            scan.pending[name] = f"no {LANDING_MARKER} yet (upload in progress, or not landed)"
            continue
        uri = join(prefix, name)
        try:
            state = expert_state(name, uri, listing_identities(uri))
        except (CheckpointError, StorageError) as exc:   # changed or vanished while we looked
            state = f"unreadable: {exc}"
        if isinstance(state, str):
            scan.pending[name] = state
        else:
            scan.complete[name] = state
    return scan


def expert_state(name: str, uri: str, listing: dict[str, FileIdentity]) -> LandedExpert | str:
    """A LandedExpert when the folder satisfies the landing convention, else the reason it does not."""
    if LANDING_MARKER not in listing:
        return f"no {LANDING_MARKER} yet"
    raw = read_small(listing[LANDING_MARKER])
    marker: dict = {}
    if raw.strip():
        try:
            marker = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{LANDING_MARKER} is neither empty nor JSON"
        if not isinstance(marker, dict):
            return f"{LANDING_MARKER} must be empty or a JSON object"
    if SINGLE_NAME not in listing and INDEX_NAME not in listing:
        return f"no {SINGLE_NAME} or {INDEX_NAME}"
    if CONFIG_NAME not in listing:
        return f"no {CONFIG_NAME}"
    weights = {n for n in listing if n.endswith(".safetensors") or n == INDEX_NAME}
    if "files" in marker:
        files = marker["files"]
        if not isinstance(files, dict):
            return f"{LANDING_MARKER}: 'files' must map file names to sizes"
        for fname, size in files.items():
            if fname not in listing:
                return f"{fname} is listed in {LANDING_MARKER} but missing (upload in progress?)"
            if listing[fname].size != size:
                return f"{fname} has {listing[fname].size} bytes, {LANDING_MARKER} says {size} (stale marker?)"
        if unlisted := sorted(weights - set(files)):
            return f"{', '.join(unlisted[:3])} not in {LANDING_MARKER} (uploaded after the marker?)"
    if SINGLE_NAME not in listing:
        try:
            index = json.loads(read_small(listing[INDEX_NAME]))
            shards = set(index["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return f"{INDEX_NAME} has no readable weight_map"
        if missing := sorted(s for s in shards if s not in listing):
            return f"shards {', '.join(missing[:3])} named by {INDEX_NAME} are missing"
    tags = marker.get("tags") or []
    tags = [tags] if isinstance(tags, str) else tags
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return f"{LANDING_MARKER}: 'tags' must be a list of strings"
    fingerprint = hashlib.sha256(json.dumps(
        sorted((n, i.size, i.etag) for n, i in listing.items()), sort_keys=True).encode()).hexdigest()
    return LandedExpert(name, uri, tuple(sorted(set(tags))), fingerprint, tuple(sorted(listing)))


# -- selections ------------------------------------------------------------------------------------


def _scan(scans: dict[str, ExpertScan], prefix: str) -> ExpertScan:
    prefix = normalize(prefix)
    if prefix not in scans:
        scans[prefix] = scan_experts(prefix)
    return scans[prefix]


def _normalized(uri: str | None) -> str | None:
    try:
        return normalize(uri) if uri else None
    except CheckpointError:  # reported where the URI is used
        return None


def _own_uris(recipe: Recipe) -> set[str]:
    """The recipe's base and output: never selected as its experts (its own output would feed itself)."""
    return {u for u in (_normalized(recipe.base), _normalized(recipe.output)) if u}


def select_experts(recipe: Recipe, scans: dict[str, ExpertScan] | None = None) -> list[LandedExpert]:
    """The complete experts a `models_from` recipe selects, in name order."""
    sel = recipe.models_from
    if not sel:
        raise SelectionError(f"{recipe.source}: recipe has no models_from")
    scan = _scan(scans if scans is not None else {}, sel["uri"])
    own = _own_uris(recipe)
    return [e for name, e in sorted(scan.complete.items()) if _selects(sel, name, e.tags) and e.uri not in own]


def _selects(sel: dict, name: str, tags: tuple[str, ...]) -> bool:
    """Whether a models_from selection takes the expert folder `name` whose marker carries `tags`."""
    return fnmatch.fnmatchcase(name, sel.get("pattern", "*")) and set(sel.get("tags", ())) <= set(tags)


def resolve_recipe(recipe: Recipe, scans: dict[str, ExpertScan] | None = None) -> Recipe:
    """The concrete recipe: `models_from` replaced by the experts it selects now; others unchanged."""
    if not recipe.models_from:
        return recipe
    scans = scans if scans is not None else {}
    chosen = select_experts(recipe, scans)
    if not chosen:
        sel = recipe.models_from
        scan = _scan(scans, sel["uri"])
        waiting = f"; pending: {', '.join(sorted(scan.pending)[:5])}" if scan.pending else ""
        raise SelectionError(
            f"{recipe.source}: models_from selects no complete expert under {scan.prefix} "
            f"(pattern {sel.get('pattern', '*')!r}, tags {list(sel.get('tags', []))}){waiting}"
        )
    concrete = recipe.with_models([e.uri for e in chosen])
    return dataclasses.replace(concrete, output=recipe.output) if concrete.output != recipe.output else concrete


def input_uris(recipe: Recipe) -> set[str]:
    """Normalised URIs of a concrete recipe's base and experts."""
    return {normalize(u) for u in [*recipe.inputs, *([recipe.base] if recipe.base else [])]}


def selected_uris(recipe: Recipe, scans: dict[str, ExpertScan] | None = None) -> set[str]:
    """Normalised URIs of everything the recipe merges now: its selection (or listed experts) and base."""
    if not recipe.models_from:
        return input_uris(recipe)
    base = {normalize(recipe.base)} if recipe.base else set()
    return {e.uri for e in select_experts(recipe, scans)} | base


# -- recipes for the watcher and the nightly run ---------------------------------------------------


def _recipe_sources(item: str) -> list[str]:
    item = str(item).strip()
    if is_s3(item):
        if item.endswith(RECIPE_SUFFIXES):
            return [normalize(item)]
        prefix = normalize(item)
        return [join(prefix, n) for n in sorted(list_dir(prefix)) if n.endswith(RECIPE_SUFFIXES)]
    path = Path(item).expanduser()
    if path.is_dir():
        return [str(p) for p in sorted(path.iterdir()) if p.is_file() and p.name.endswith(RECIPE_SUFFIXES)]
    return [str(path)]


def load_recipes(spec: str | list[str] | None) -> tuple[list[Recipe], list[str]]:
    """Recipes from files, directories or S3 prefixes (recipes must have an output); plus the errors."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    recipes: list[Recipe] = []
    errors: list[str] = []
    names: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for item in items:
        try:
            sources = _recipe_sources(item)
        except (CheckpointError, StorageError) as exc:
            errors.append(f"{item}: {exc}")
            continue
        if not sources:
            errors.append(f"{item}: no recipe files (*.yaml, *.yml) there")
        for source in sources:
            try:
                text = read_small(source).decode()
                recipe = parse_recipe(text, source=source)
            except (CheckpointError, StorageError, UnicodeDecodeError, ValueError) as exc:
                errors.append(f"{source}: {exc}" if source not in str(exc) else str(exc))
                continue
            output = _normalized(recipe.output)
            if not recipe.output:
                errors.append(f"{source}: a scheduled recipe needs 'output:' (where to publish the model)")
            elif recipe.name in names:
                errors.append(f"{source}: recipe name {recipe.name!r} is also used by {names[recipe.name]}")
            elif output is not None and output in outputs:  # each would replace the other's model every night
                errors.append(f"{source}: output {recipe.output} is also the output of {outputs[output]}")
            else:
                names[recipe.name] = source
                outputs[output] = source
                recipes.append(recipe)
    cyclic = _in_cycles(recipes)
    errors += [f"{r.source}: in the recipes {cyclic[r.name]}, each merges the output of the one before it, so "
               "each publish would start the next merge, for ever; not scheduled (publish one of them outside "
               "the others' selection, or narrow their models_from)" for r in recipes if r.name in cyclic]
    return [r for r in recipes if r.name not in cyclic], errors


def _feeds(producer: Recipe, consumer: Recipe) -> bool:
    """Whether the producer's output is among what the consumer merges: its base, a listed expert,
    or a folder its models_from selects (by prefix and pattern: mergeline's markers carry no tags)."""
    out = _normalized(producer.output)
    if not out or producer is consumer:  # a recipe never selects its own output
        return False
    if out in {_normalized(u) for u in [*consumer.inputs, consumer.base]}:
        return True
    sel = consumer.models_from
    parent, _, name = out.rpartition("/")
    return bool(sel) and parent == _normalized(sel["uri"]) and _selects(sel, name, ())


def _in_cycles(recipes: list[Recipe]) -> dict[str, str]:
    """Recipe name -> the cycle it is on ("a -> b -> a"), for recipes that merge, through one
    another's outputs, their own: the watcher would merge them in turn without end."""
    feeds = {r.name: [c.name for c in recipes if _feeds(r, c)] for r in recipes}
    cycles = {}
    for start in feeds:
        paths, seen = [[start]], {start}
        while paths and start not in cycles:
            path = paths.pop(0)
            for nxt in feeds[path[-1]]:
                if nxt == start:
                    cycles[start] = " -> ".join([*path, start])
                elif nxt not in seen:
                    seen.add(nxt)
                    paths.append([*path, nxt])
    return cycles


def watched_prefixes(experts: str | list[str] | None, recipes: list[Recipe]) -> list[str]:
    """The prefixes to scan: those given plus every recipe's models_from prefix."""
    given = [experts] if isinstance(experts, str) else list(experts or [])
    given += [r.models_from["uri"] for r in recipes if r.models_from]
    return list(dict.fromkeys(normalize(p) for p in given))
