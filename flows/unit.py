"""One layer unit's merge: read its tensors from every input, merge, stream them into a shard.

This is the body of the `merge-layer-<unit>` Prefect task. It runs wherever the task runner
puts it (a thread here, a Dask worker elsewhere) and needs only the job: checkpoints' headers,
the unit's tensor names and the method. Tensors never pass through the flow process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from merge_ops import (
    METHODS,
    RowStream,
    kept_bytes,
    merge_stream,
    merge_tensors,
    output_bytes,
    scratch_bytes,
    stream_passes,
    window_rows,
)
from storage import Checkpoint, ShardWriter, read_many
from storage.cache import Tally
from storage.reader import io_pool, io_threads
from storage.uri import is_s3
from storage.version import code_version

from .plan import Plan, Unit

_gpu_slots: dict[str, threading.Semaphore] = {}
_gpu_lock = threading.Lock()

DEFAULT_MEMORY_BUDGET_MB = 512
# Local inputs are read by the unit's prefetch thread alone (S3 ones by the storage I/O pool, for
# latency): from the page cache one thread copies as fast as sixteen on a small machine, and every
# thread that allocates tensors gets its own glibc arena that keeps what it freed (measured: TIES
# on the 250M benchmark peaked at 1.30 GiB with 16 reader threads, 0.88 GiB with one).
_LOCAL_READERS = 1


@dataclass(frozen=True)
class UnitJob:
    unit: Unit
    experts: tuple[Checkpoint, ...]
    base: Checkpoint | None
    method: str
    parameters: dict
    weights: tuple[float, ...]
    seed: int
    specs: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
    staging: str
    device: str
    side_by_side: int = 1  # units whose whole tensors the memory budget holds at once (share_budget)

    @classmethod
    def from_plan(cls, plan: Plan, unit: Unit, staging: str) -> UnitJob:
        r = plan.recipe
        base = plan.base if METHODS[r.method].needs_base else None  # linear records a base but never reads it
        return cls(unit, tuple(plan.experts), base, r.method, r.parameters, r.weights, r.seed,
                   tuple(plan.specs(unit)), staging, plan.device)

    @property
    def sources(self) -> list[Checkpoint]:
        """Every checkpoint the unit reads: the experts, then the base if the method uses it."""
        return [*self.experts, *([self.base] if self.base else [])]

    def cache_key(self) -> str:
        """Everything that determines the shard's bytes, and where it is staged."""
        inputs = []
        for ckpt in self.sources:
            files = {ckpt.tensors[n].file for n in self.unit.tensors}
            inputs.append({
                "files": {f: ckpt.files[f].as_dict() for f in sorted(files)},
                "ranges": [[n, ckpt.tensors[n].file, ckpt.tensors[n].start, ckpt.tensors[n].end]
                           for n in self.unit.tensors],
            })
        key = {
            "unit": self.unit.name, "shard": self.unit.shard, "inputs": inputs, "method": self.method,
            "parameters": self.parameters, "weights": self.weights, "seed": self.seed,
            "specs": [[n, str(d), list(s)] for n, d, s in self.specs], "staging": self.staging,
            "code": code_version(),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class TensorStep:
    """How a unit merges one of its tensors, and the memory that takes."""
    name: str
    window: int | None  # rows per window if the tensor is too large to merge whole, else None
    held: int           # bytes it holds while it merges: inputs, output, what the merge keeps
    read_ahead: bool    # whether its inputs are read while the previous tensor merges
    inputs: int         # bytes of its inputs read ahead


def tensor_steps(job: UnitJob) -> list[TensorStep]:
    """The unit's tensors in order. One that does not fit its unit's share of the memory budget
    whole (the budget over side_by_side units) is streamed: read and merged a window of rows at a
    time, its windows taking a quarter of the budget, so that four such units (the CLI's default
    --workers) merge side by side. A tensor's inputs are read ahead only if they fit in the share
    beside the previous tensor's merge."""
    room = memory_budget() - scratch_bytes(len(job.experts), job.device, streamed=True)
    share = room // job.side_by_side
    steps: list[TensorStep] = []
    for name, out_dtype, shape in job.specs:
        per_input = sum(c.tensors[name].torch_dtype.itemsize for c in job.sources)  # bytes per element
        numel = math.prod(shape)
        inputs = numel * per_input
        whole = inputs + output_bytes(shape, out_dtype, job.device) + kept_bytes(
            job.method, job.parameters, len(job.experts), numel, job.device)
        if shape and whole > share:  # two windows of each input (one read ahead) and one of the output
            windowed = 2 * per_input + out_dtype.itemsize
            rows = window_rows(shape, windowed, room // 4)
            steps.append(TensorStep(name, rows, rows * math.prod(shape[1:]) * windowed, False, 0))
        else:
            ahead = bool(steps) and steps[-1].held + inputs <= share
            steps.append(TensorStep(name, None, whole, ahead, inputs))
    return steps


def share_budget(jobs: list[UnitJob]) -> list[UnitJob]:
    """The jobs, sized so that the cores all merge. Where most of the model's elements sit in
    units too large for one per core (up to 4: the CLI's default --workers, each merging with
    merge_threads() = cores // 4 threads) to fit the memory budget at once, every unit gets that
    share of it and streams what is larger. Only on the CPU, and for methods that read a streamed
    tensor once (merge_ops.stream_passes): TIES's and DARE-L1's extra passes cost more than the
    cores gain, and a GPU's merges take turns anyway. Measured on 2 cores (docs/benchmarks.md):
    at 1B parameters, where a layer's whole MLP matrices left room for one unit at a time, task
    arithmetic 1.6x and linear 1.1-1.3x faster; at 250M, where only the embeddings' units are that
    large, sharing made task arithmetic 1.2x slower, so there it is left alone."""
    cores = max(1, min(4, os.cpu_count() or 1))
    if (cores == 1 or not jobs or torch.device(jobs[0].device).type != "cpu"
            or stream_passes(jobs[0].method, jobs[0].parameters) > 1):
        return jobs
    budget = memory_budget()
    sizes = [(unit_bytes(j), sum(math.prod(shape) for _, _, shape in j.specs)) for j in jobs]
    crowded = sum(numel for peak, numel in sizes if peak * cores > budget)
    if 2 * crowded <= sum(numel for _, numel in sizes):
        return jobs
    return [dataclasses.replace(j, side_by_side=cores) for j in jobs]


def unit_bytes(job: UnitJob, steps: list[TensorStep] | None = None) -> int:
    """Memory a unit holds at its peak: a tensor's merge (TensorStep.held) and the next tensor's
    inputs read ahead, plus the merge's chunk buffers (merge_ops.scratch_bytes). On the CPU the
    merged rows go to the shard writer a block at a time (merge_ops.output_bytes), so a whole
    tensor's output is never held. `steps`: tensor_steps(job), if already made."""
    steps = tensor_steps(job) if steps is None else steps
    ahead = [nxt.inputs if nxt.read_ahead else 0 for nxt in steps[1:]] + [0]
    scratch = scratch_bytes(len(job.experts), job.device, streamed=any(s.window for s in steps))
    return max(s.held + a for s, a in zip(steps, ahead, strict=True)) + scratch


def run_unit(job: UnitJob) -> dict:
    """Merge one unit into its staged shard; returns the shard's description (JSON-able).

    Runs once the process's memory budget has room for the unit (see `memory_budget`), with
    `merge_threads()` intra-op threads for its CPU merges.
    """
    steps = tensor_steps(job)
    job, tally = _tallied(job)
    sources = job.sources
    with _budget.reserve(unit_bytes(job, steps)), \
            ShardWriter(job.staging, job.unit.shard, list(job.specs)) as writer, \
            ThreadPoolExecutor(max_workers=1) as prefetch:
        remote = any(is_s3(c.uri) for c in sources)
        readers = None if remote else _LOCAL_READERS
        copies = torch.cuda.Stream(job.device) if job.device != "cpu" else None

        def read(name: str):
            if copies is not None:
                return prefetch.submit(_read_to_gpu, job, name, copies)
            return prefetch.submit(read_many, [(c, name) for c in sources], max_workers=readers)

        pending = None
        for i, step in enumerate(steps):
            if step.window:  # windows of S3 inputs are read in parallel, local ones by one thread
                _merge_streamed(job, step.name, step.window, writer, io_pool(io_threads()) if remote else prefetch)
                continue
            inputs = (pending or read(step.name)).result()
            pending = read(steps[i + 1].name) if i + 1 < len(steps) and steps[i + 1].read_ahead else None
            _merge(job, step.name, inputs, writer)
            del inputs
    _return_freed_memory()
    info = writer.result
    return {"filename": info.filename, "uri": info.uri, "size": info.size, "sha256": info.sha256,
            "tensors": list(info.tensors), "etag": info.etag, "unit": job.unit.name,
            "read_cache": tally.stats.as_dict() if tally else None}


def _tallied(job: UnitJob) -> tuple[UnitJob, Tally | None]:
    """The job reading through a Tally of its inputs' read cache, if they have one: what this unit
    read through the cache, counted apart from the units merging beside it (and on any machine)."""
    cache = next((c.cache for c in job.sources if c.cache is not None), None)
    if cache is None:
        return job, None
    tally = cache.tally()
    return dataclasses.replace(job, experts=tuple(c.reading_through(tally) for c in job.experts),
                               base=job.base.reading_through(tally) if job.base else None), tally


def _return_freed_memory() -> None:
    """Hand what the unit freed back to the OS. glibc keeps freed blocks under its mmap threshold
    (up to 32 MiB: layer tensors, stream windows) in per-thread arenas for reuse; with several
    units' threads that retention held peak RSS 0.1-0.2 GiB over the budget on the wider bench
    model, and trimming after each unit brought it back, at no measurable cost in time."""
    if _malloc_trim is not None:
        _malloc_trim(0)


_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only; elsewhere nothing to do


def memory_budget() -> int:
    """Bytes of tensors that the units merging at once in this process may hold together:
    MERGELINE_MEMORY_BUDGET_MB (default 512). A unit larger than the budget runs alone. Peak
    memory is then about the interpreter's own plus this, whatever the model size or --workers."""
    return int(float(os.environ.get("MERGELINE_MEMORY_BUDGET_MB", DEFAULT_MEMORY_BUDGET_MB)) * 2**20)


class _Budget:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._used = 0

    @contextmanager
    def reserve(self, nbytes: int):
        limit = memory_budget()
        want = min(nbytes, limit)
        with self._cond:
            while self._used and self._used + want > limit:
                self._cond.wait()
            self._used += want
        try:
            yield
        finally:
            with self._cond:
                self._used -= want
                self._cond.notify_all()


_budget = _Budget()


def merge_threads() -> int:
    """Intra-op threads per CPU merge: MERGELINE_MERGE_THREADS, default cores // 4 (at least 1; 4 is
    the CLI's default --workers). Units already merge in parallel; torch's OpenMP threads on top of
    them oversubscribe the cores, and then their spinning barriers cost more than they gain
    (measured on 2 shared cores, whole 250M model merged unit by unit: TIES 24 s with 1 thread,
    338 s with 2)."""
    default = max(1, (os.cpu_count() or 1) // 4)
    return max(1, int(os.environ.get("MERGELINE_MERGE_THREADS", default)))


_threads_lock = threading.Lock()
_threads_active = 0
_threads_original = torch.get_num_threads()


@contextmanager
def _merge_thread_count():
    """torch.set_num_threads applies to the calling thread (and to threads that start later);
    the process's original count comes back when the last merge in it ends."""
    global _threads_active
    with _threads_lock:
        _threads_active += 1
        torch.set_num_threads(merge_threads())
    try:
        yield
    finally:
        with _threads_lock:
            _threads_active -= 1
            if _threads_active == 0:
                torch.set_num_threads(_threads_original)


@dataclass
class _OnGpu:
    """A tensor's inputs, copied to the GPU on a side stream: usable once `ready` has passed."""
    tensors: list[torch.Tensor]
    ready: torch.cuda.Event


def _read_to_gpu(job: UnitJob, name: str, copies: torch.cuda.Stream) -> _OnGpu:
    """The prefetch thread's read for a CUDA merge: each input read into pinned (page-locked) host
    memory, then copied to the GPU on the unit's copy stream, so that the copy overlaps the merge
    of the tensor before. From pageable memory a copy blocks the merging thread and goes through
    the driver's staging buffer (7 against 55 GB/s on an H100). torch's caching host allocator
    reuses the pinned buffers from tensor to tensor."""
    hosts = [torch.empty(c.tensors[name].shape, dtype=c.tensors[name].torch_dtype, pin_memory=True)
             for c in job.sources]
    read_many([(c, name) for c in job.sources], outs=hosts, max_workers=len(hosts))
    with torch.cuda.stream(copies):
        moved = [h.to(job.device, non_blocking=True) for h in hosts]
        ready = copies.record_event()
    return _OnGpu(moved, ready)


def _merge(job: UnitJob, name: str, inputs: list[torch.Tensor] | _OnGpu, writer: ShardWriter) -> None:
    """One tensor merged whole and written: on the CPU from host tensors, its rows written a block
    at a time; on a GPU from _read_to_gpu's copies, the result coming back in pinned memory."""
    out_dtype = dict((n, d) for n, d, _ in job.specs)[name]
    kw = dict(weights=list(job.weights), seed=job.seed, name=name, out_dtype=out_dtype, labels=_labels(job),
              **job.parameters)
    tensors = inputs.tensors if isinstance(inputs, _OnGpu) else inputs
    experts = tensors[: len(job.experts)]
    base = tensors[len(job.experts)] if job.base else None
    if job.device == "cpu":
        with _merge_thread_count():
            merge_tensors(job.method, experts, base, write=lambda rows: writer.write(name, rows), **kw)
        return
    with _gpu_slot(job.device):  # one merge at a time per GPU: tasks sharing a worker never fight over it
        stream = torch.cuda.current_stream(job.device)
        stream.wait_event(inputs.ready)
        for t in tensors:  # made on the copy stream: not to be reused before this stream is done with them
            t.record_stream(stream)
        merged = merge_tensors(job.method, experts, base, **kw)
        host = torch.empty(merged.shape, dtype=merged.dtype, pin_memory=True)
        host.copy_(merged, non_blocking=True)
        stream.synchronize()
    writer.write(name, host)


def _labels(job: UnitJob) -> list[str]:
    """The job's inputs as the user knows them, for merge_ops' errors: experts, then the base."""
    return ([f"expert {i} ({c.uri})" for i, c in enumerate(job.experts)]
            + ([f"the base ({job.base.uri})"] if job.base else []))


def _merge_streamed(job: UnitJob, name: str, rows: int, writer: ShardWriter, read_ahead: Executor) -> None:
    """Merge a tensor too large to hold whole, `rows` rows of every input at a time."""
    out_dtype = dict((n, d) for n, d, _ in job.specs)[name]
    labels = _labels(job)
    streams = [RowStream(c.tensors[name].shape, c.tensors[name].torch_dtype,
                         lambda r0, r1, out, c=c: c.read_tensor(name, (r0, r1), out), rows,
                         f"{label}, tensor {name!r}", job.device, read_ahead, fills=True)
               for c, label in zip(job.sources, labels, strict=True)]
    experts, base = streams[: len(job.experts)], (streams[-1] if job.base else None)
    with _merge_thread_count() if job.device == "cpu" else _gpu_slot(job.device):
        merge_stream(job.method, experts, base, write=lambda block: writer.write(name, block), labels=labels,
                     weights=list(job.weights), seed=job.seed, name=name, out_dtype=out_dtype, **job.parameters)


def _gpu_slot(device: str) -> threading.Semaphore:
    with _gpu_lock:
        return _gpu_slots.setdefault(device, threading.Semaphore(1))
