"""Open a checkpoint from its headers alone; read tensors (or row ranges) with ranged reads.

A checkpoint is an HF directory (local or S3) with config.json and either model.safetensors or
model.safetensors.index.json + shards. Opening reads only the small files and the safetensors
headers, validates them strictly, and pins every weight file's identity, so later reads are of
exactly the bytes that were validated.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from storage import s3
from storage.cache import ReadCache, Tally
from storage.errors import CheckpointError
from storage.headers import TensorInfo, header_length, parse_header
from storage.uri import (
    FileIdentity,
    check_filename,
    exists,
    is_s3,
    join,
    listing_identities,
    map_range,
    normalize,
    read_into,
    stat,
)

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SIDECAR_NAME = "mergeline.json"
COMPLETE_MARKER = "_MERGELINE_COMPLETE"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
EXTRA_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
})
# Files a model's own code needs (config.json's auto_map: configuration_*.py, modeling_*.py,
# tokenization_*.py, and tiktoken vocabularies): without them `trust_remote_code` loading fails.
EXTRA_SUFFIXES = (".py", ".tiktoken")
MAX_SMALL_FILE = 100 * 1000 * 1000


def io_threads() -> int:
    return max(1, int(os.environ.get("MERGELINE_IO_THREADS", "16")))


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def io_pool(size: int) -> ThreadPoolExecutor:
    """A long-lived pool per size, so its threads keep their boto3 clients and connections."""
    key = (os.getpid(), size)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = ThreadPoolExecutor(size, thread_name_prefix="mergeline-io")
        return _pools[key]


def fetch(ident: FileIdentity, start: int, end: int, cache: ReadCache | Tally | None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """Bytes [start, end) of a file as a uint8 tensor, read straight into its memory (`out`'s,
    if given: a contiguous CPU tensor of exactly that many bytes).

    A large range of a local file with no `out` is mapped instead of read (storage.uri.map_range):
    reading it would copy the page cache into fresh pages, and on the benchmark machine faulting
    those in cost more than the copy (task arithmetic on one 32.8M-element tensor, 4 experts:
    0.29-0.32 s read, 0.11-0.12 s mapped). Only S3 reads go through the cache: copying a local
    file into a local cache gains nothing.
    """
    local = not is_s3(ident.uri)
    if out is None and local and end - start >= _MAP_MIN and start % _MAP_ALIGN == 0:
        mapped, offset = map_range(ident, start, end)
        return torch.frombuffer(mapped, dtype=torch.uint8, offset=offset, count=end - start)
    buf = torch.empty(end - start, dtype=torch.uint8) if out is None else out.reshape(-1).view(torch.uint8)
    if buf.numel() != end - start:
        raise ValueError(f"{ident.uri}: {end - start} bytes to read into a buffer of {buf.numel()}")
    if end == start:
        return buf
    view = memoryview(buf.numpy())
    if cache is None or local:
        read_into(ident, start, view)
    elif not cache.get_into(ident, start, view):
        read_into(ident, start, view)
        cache.record_miss(len(view))
        cache.put(ident, start, view)
    return buf


_MAP_MIN = 1 << 20  # smaller reads (headers, configs, norms) are cheaper to copy than to map
_MAP_ALIGN = 8      # a mapped range must start aligned for every dtype's view of it


def read_small(ident: FileIdentity, cache: ReadCache | None) -> bytes:
    if ident.size > MAX_SMALL_FILE:
        raise CheckpointError(f"{ident.uri}: {ident.size} bytes is too large for a config/tokenizer file")
    return fetch(ident, 0, ident.size, cache).numpy().tobytes()


def _read_json(ident: FileIdentity, cache: ReadCache | None) -> dict:
    try:
        data = json.loads(read_small(ident, cache))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ident.uri}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{ident.uri}: expected a JSON object")
    return data


def read_header(ident: FileIdentity, filename: str, cache: ReadCache | None) -> list[TensorInfo]:
    """Two ranged reads: the 8-byte length, then the header; never the tensor data."""
    n = header_length(fetch(ident, 0, min(8, ident.size), cache).numpy().tobytes(), ident.size, ident.uri)
    raw = fetch(ident, 8, 8 + n, cache).numpy().tobytes()
    return parse_header(raw, file=filename, file_size=ident.size, where=ident.uri)[0]


class Checkpoint:
    """An opened, validated checkpoint: tensor locations and file identities, no tensor data."""

    def __init__(self, uri: str, config: dict, tensors: dict[str, TensorInfo], files: dict[str, FileIdentity],
                 listing: dict[str, FileIdentity], cache: ReadCache | Tally | None):
        self.uri = uri
        self.config = config
        self.model_type: str | None = config.get("model_type")
        self.tensors = tensors
        self.files = files
        self.extra_files = sorted(n for n in listing if n in EXTRA_FILES or n.endswith(EXTRA_SUFFIXES))
        self.identity = hashlib.sha256(
            json.dumps([files[f].as_dict() for f in sorted(files)], sort_keys=True).encode()
        ).hexdigest()
        self.param_count = sum(t.numel for t in tensors.values())
        self.cache = cache
        self._listing = listing

    def __repr__(self) -> str:
        return f"Checkpoint({self.uri!r}, {len(self.tensors)} tensors, {len(self.files)} files)"

    def reading_through(self, cache: ReadCache | Tally | None) -> Checkpoint:
        """The same checkpoint, its reads going through `cache` (e.g. a task's Tally of its cache)."""
        other = copy.copy(self)
        other.cache = cache
        return other

    def read_tensor(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The tensor (or rows [r0, r1) of its first dimension) as a CPU tensor in its stored dtype:
        its own memory (for a large local tensor, the file's pages mapped copy-on-write: see fetch),
        or `out`'s (a contiguous CPU tensor of that many bytes) filled."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.uri}: no tensor {name!r}")
        shape, start, end = info.shape, info.start, info.end
        if rows is not None:
            r0, r1 = rows
            if not shape or not (0 <= r0 <= r1 <= shape[0]):
                raise CheckpointError(f"{self.uri}: rows {rows} out of range for {name!r} of shape {shape}")
            row_bytes = (info.nbytes // shape[0]) if shape[0] else 0
            start, end = info.start + r0 * row_bytes, info.start + r1 * row_bytes
            shape = (r1 - r0, *shape[1:])
        buf = fetch(self.files[info.file], start, end, self.cache, out)
        return buf.view(info.torch_dtype).reshape(shape)

    def read_bytes(self, filename: str) -> bytes:
        """A small whole file of the checkpoint (config, tokenizer, sidecar)."""
        check_filename(filename, self.uri)
        if filename not in self._listing:
            raise CheckpointError(f"{self.uri}: has no file {filename!r}")
        return read_small(self._listing[filename], self.cache)


def _layout(uri: str, listing: dict[str, FileIdentity]) -> str:
    """SINGLE_NAME or INDEX_NAME, in transformers' order of preference; refuses anything else."""
    if SINGLE_NAME in listing or INDEX_NAME in listing:
        return SINGLE_NAME if SINGLE_NAME in listing else INDEX_NAME
    pickles = sorted(n for n in listing if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{uri}: holds only pickle weights ({', '.join(pickles[:3])}); mergeline reads only safetensors "
            "and never unpickles. Convert the checkpoint to safetensors first."
        )
    others = sorted(n for n in listing if n.endswith(".safetensors"))
    raise CheckpointError(
        f"{uri}: no {SINGLE_NAME} or {INDEX_NAME}"
        + (f" (found {', '.join(others[:3])}, not an HF model layout)" if others else " (not a checkpoint)")
    )


def _sharded(uri: str, listing: dict[str, FileIdentity], cache: ReadCache | None) -> tuple[list[str], dict]:
    index = _read_json(listing[INDEX_NAME], cache)
    weight_map = index.get("weight_map")
    where = join(uri, INDEX_NAME)
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{where}: no weight_map")
    for name, file in weight_map.items():
        check_filename(file, f"{where} (tensor {name!r})")
        if not file.endswith(".safetensors"):
            raise CheckpointError(f"{where}: tensor {name!r} maps to {file!r}, not a .safetensors file")
        if file not in listing:
            raise CheckpointError(f"{where}: tensor {name!r} is in shard {file!r}, which is missing")
    return sorted(set(weight_map.values())), weight_map


def _check_marker(uri: str, listing: dict[str, FileIdentity]) -> None:
    marker = _read_json(listing[COMPLETE_MARKER], None)
    files = marker.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{join(uri, COMPLETE_MARKER)}: malformed completion marker")
    for name, size in files.items():
        if name not in listing or listing[name].size != size:
            raise CheckpointError(f"{uri}: {name!r} does not match the completion marker (incomplete or modified)")


def open_checkpoint(uri: str, *, cache: ReadCache | None = None) -> Checkpoint:
    """Read the layout, config and safetensors headers; validate; raise CheckpointError on bad input."""
    uri = normalize(uri)
    listing = listing_identities(uri)
    if not listing:
        raise CheckpointError(f"{uri}: no checkpoint there (missing or empty)")
    if SIDECAR_NAME in listing:
        if COMPLETE_MARKER not in listing:
            raise CheckpointError(f"{uri}: mergeline output is incomplete (no {COMPLETE_MARKER}); treat it as absent")
        _check_marker(uri, listing)
    layout = _layout(uri, listing)
    if CONFIG_NAME not in listing:
        raise CheckpointError(f"{uri}: no {CONFIG_NAME}")
    config = _read_json(listing[CONFIG_NAME], cache)
    files, weight_map = ([SINGLE_NAME], None) if layout == SINGLE_NAME else _sharded(uri, listing, cache)

    # S3 listings carry no VersionId; a HEAD per weight file pins the version where there is one.
    def load(file: str) -> tuple[FileIdentity, list[TensorInfo]]:
        ident = stat(join(uri, file)) if is_s3(uri) else listing[file]
        return ident, read_header(ident, file, cache)

    loaded = list(io_pool(io_threads()).map(load, files)) if len(files) > 1 else [load(f) for f in files]
    tensors: dict[str, TensorInfo] = {}
    for file, (_, infos) in zip(files, loaded, strict=True):
        for t in infos:
            if t.name in tensors:
                raise CheckpointError(f"{uri}: tensor {t.name!r} is in both {tensors[t.name].file} and {file}")
            if weight_map is not None and weight_map.get(t.name) != file:
                raise CheckpointError(f"{join(uri, file)}: tensor {t.name!r} is not mapped to this shard by the index")
            tensors[t.name] = t
    if weight_map is not None and (missing := [n for n in weight_map if n not in tensors]):
        raise CheckpointError(f"{join(uri, INDEX_NAME)}: tensors {missing[:5]} are in no shard's header")
    return Checkpoint(uri, config, tensors, {f: ident for f, (ident, _) in zip(files, loaded, strict=True)},
                      listing, cache)


def read_provenance(uri: str) -> dict | None:
    """The mergeline.json at uri (complete or not), or None where mergeline has published nothing."""
    listing = listing_identities(normalize(uri))
    return _read_json(listing[SIDECAR_NAME], None) if SIDECAR_NAME in listing else None


def is_complete(uri: str) -> bool:
    """Whether a (mergeline-written) checkpoint has its completion marker; without it, treat as absent."""
    return exists(join(normalize(uri), COMPLETE_MARKER))


def read_many(items: list[tuple[Checkpoint, str]], *, rows=None, max_workers: int | None = None,
              outs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Read many tensors in parallel, results in input order.

    rows: None, one (r0, r1) for every item, or a list with one entry (None or (r0, r1)) per item.
    outs: one buffer per item to read into (see Checkpoint.read_tensor), e.g. pinned memory.
    The pool size is max_workers, else MERGELINE_IO_THREADS (default 16).
    """
    per = list(rows) if isinstance(rows, list) else [rows] * len(items)
    bufs = [None] * len(items) if outs is None else list(outs)
    if len(per) != len(items) or len(bufs) != len(items):
        raise ValueError(f"{len(items)} items to read, with {len(per)} rows entries and {len(bufs)} buffers")
    jobs = [(ck, name, r, out) for (ck, name), r, out in zip(items, per, bufs, strict=True)]
    if len(jobs) <= 1:
        return [ck.read_tensor(name, r, out) for ck, name, r, out in jobs]
    return list(io_pool(max_workers or io_threads()).map(lambda j: j[0].read_tensor(*j[1:]), jobs))


def check_compatible(checkpoints: list[Checkpoint], *, max_listed: int = 10) -> list[str]:
    """Raise CheckpointError listing the first differences in model_type, tensor names or shapes
    between each input and input 0; return notes on dtype differences (allowed)."""
    if not checkpoints:
        raise CheckpointError("no checkpoints to compare")
    ref = checkpoints[0]
    problems: list[str] = []
    notes: list[str] = []
    for i, ck in enumerate(checkpoints[1:], 1):
        who = f"input {i} ({ck.uri})"
        if ck.model_type != ref.model_type:
            problems.append(f"{who}: model_type {ck.model_type!r}, input 0 has {ref.model_type!r}")
        for n, t in ref.tensors.items():  # in file order, so the first differences listed are the first layers'
            if n not in ck.tensors:
                problems.append(f"{who}: missing tensor {n!r}")
            elif ck.tensors[n].shape != t.shape:
                problems.append(f"{who}: tensor {n!r} has shape {ck.tensors[n].shape}, input 0 has {t.shape}")
        problems += [f"{who}: extra tensor {n!r}" for n in ck.tensors if n not in ref.tensors]
        pairs: dict[tuple[str, str], list[str]] = {}
        for n, t in ref.tensors.items():
            if n in ck.tensors and ck.tensors[n].dtype != t.dtype:
                pairs.setdefault((t.dtype, ck.tensors[n].dtype), []).append(n)
        notes += [f"{who}: {len(names)} tensors stored as {theirs} where input 0 has {ours} (e.g. {names[0]!r})"
                  for (ours, theirs), names in pairs.items()]
        tied = [c.config.get("tie_word_embeddings") for c in (ref, ck)]
        if tied[0] != tied[1]:  # the output takes input 0's config.json: its lm_head may be ignored
            notes.append(f"{who}: tie_word_embeddings is {tied[1]}, input 0 has {tied[0]} (the output keeps input 0's)")
    if problems:
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise CheckpointError(
            f"inputs are not compatible with input 0 ({ref.uri}); {len(problems)} differences:\n  "
            + "\n  ".join(problems[:max_listed]) + more
        )
    return notes


def local_copy(ckpt: Checkpoint, directory: str | os.PathLike) -> str:
    """A local directory holding the checkpoint, for libraries that only read local files
    (transformers' from_pretrained). Local checkpoints are used in place; S3 ones are downloaded
    (weights, index, config, tokenizer) into `directory`."""
    if not is_s3(ckpt.uri):
        return ckpt.uri
    os.makedirs(directory, exist_ok=True)
    names = sorted(set(ckpt.files) | set(ckpt.extra_files) | ({INDEX_NAME} & set(ckpt._listing)))

    def get(name: str) -> None:
        bucket, key = s3.split_s3_uri(join(ckpt.uri, check_filename(name, ckpt.uri)))
        s3.download_file(bucket, key, os.path.join(directory, name))

    list(io_pool(io_threads()).map(get, names))
    return str(directory)
