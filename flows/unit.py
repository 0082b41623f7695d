"""One layer unit's merge: read its tensors from every input, merge, stream them into a shard.

This is the body of the `merge-layer-<unit>` Prefect task. It runs wherever the task runner
puts it (a thread here, a Dask worker elsewhere) and needs only the job: checkpoints' headers,
the unit's tensor names and the method. Tensors never pass through the flow process.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from merge_ops import METHODS, merge_tensors
from storage import Checkpoint, ShardWriter, read_many
from storage.version import code_version

from .plan import Plan, Unit

_gpu_slots: dict[str, threading.Semaphore] = {}
_gpu_lock = threading.Lock()


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

    @classmethod
    def from_plan(cls, plan: Plan, unit: Unit, staging: str) -> UnitJob:
        r = plan.recipe
        base = plan.base if METHODS[r.method].needs_base else None  # linear records a base but never reads it
        return cls(unit, tuple(plan.experts), base, r.method, r.parameters, r.weights, r.seed,
                   tuple(plan.specs(unit)), staging, plan.device)

    def cache_key(self) -> str:
        """Everything that determines the shard's bytes, and where it is staged."""
        inputs = []
        for ckpt in (*self.experts, *([self.base] if self.base else [])):
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


def run_unit(job: UnitJob) -> dict:
    """Merge one unit into its staged shard; returns the shard's description (JSON-able)."""
    names = job.unit.tensors
    sources = [*job.experts, *([job.base] if job.base else [])]
    with ShardWriter(job.staging, job.unit.shard, list(job.specs)) as writer, \
            ThreadPoolExecutor(max_workers=1) as prefetch:
        pending = prefetch.submit(read_many, [(c, names[0]) for c in sources])
        for i, name in enumerate(names):
            tensors = pending.result()
            if i + 1 < len(names):  # read the next tensor while this one merges
                pending = prefetch.submit(read_many, [(c, names[i + 1]) for c in sources])
            writer.write(name, _merge(job, name, tensors))
            del tensors
    info = writer.result
    return {"filename": info.filename, "uri": info.uri, "size": info.size, "sha256": info.sha256,
            "tensors": list(info.tensors), "unit": job.unit.name}


def _merge(job: UnitJob, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    out_dtype = dict((n, d) for n, d, _ in job.specs)[name]
    experts = tensors[: len(job.experts)]
    base = tensors[len(job.experts)] if job.base else None
    if job.device == "cpu":
        return merge_tensors(job.method, experts, base, weights=list(job.weights), seed=job.seed,
                             name=name, out_dtype=out_dtype, **job.parameters)
    with _gpu_slot(job.device):  # one merge at a time per GPU: tasks sharing a worker never fight over it
        moved = [t.to(job.device, non_blocking=True) for t in experts]
        base = base.to(job.device) if base is not None else None
        merged = merge_tensors(job.method, moved, base, weights=list(job.weights), seed=job.seed,
                               name=name, out_dtype=out_dtype, **job.parameters)
        return merged.cpu()


def _gpu_slot(device: str) -> threading.Semaphore:
    with _gpu_lock:
        return _gpu_slots.setdefault(device, threading.Semaphore(1))
