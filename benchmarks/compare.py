"""Compare two merged checkpoints tensor by tensor: the merged task vectors (merged - base) by cosine
similarity, and the merged weights by their largest absolute difference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from merge_ops.topk import keep_count


def _files(model_dir: Path) -> dict[str, Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / f for name, f in weight_map.items()}
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({name: f for name in h.keys()})
    return out


class _Reader:
    def __init__(self, model_dir: Path):
        self.map = _files(model_dir)
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        f = self.map[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), "pt")
        return self._open[f].get_tensor(name)


def compare(a_dir: Path, b_dir: Path, base_dir: Path) -> dict:
    """{cosine, max_abs_diff, max_abs_diff_tensor, differing_fraction, rel_l2, tensors}."""
    a, b, base = _Reader(a_dir), _Reader(b_dir), _Reader(base_dir)
    names = sorted(base.map)
    missing = [n for n in names if n not in a.map or n not in b.map]
    if missing:
        raise ValueError(f"outputs lack tensors, e.g. {missing[:3]}")
    dot = na = nb = diff2 = 0.0
    max_abs, where, differing, total = 0.0, "", 0, 0
    for name in names:
        t0 = base.get(name).double().reshape(-1)
        ta, tb = a.get(name), b.get(name)
        if ta.shape != tb.shape:
            raise ValueError(f"{name}: shapes {tuple(ta.shape)} and {tuple(tb.shape)} differ")
        differing += int((ta != tb).sum())
        total += ta.numel()
        ta, tb = ta.double().reshape(-1), tb.double().reshape(-1)
        d = (ta - tb).abs_()
        m = float(d.max()) if d.numel() else 0.0
        if m > max_abs:
            max_abs, where = m, name
        diff2 += float((d * d).sum())
        va, vb = ta - t0, tb - t0
        dot += float(va @ vb)
        na += float(va @ va)
        nb += float(vb @ vb)
    cos = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")
    return {"cosine": cos, "max_abs_diff": max_abs, "max_abs_diff_tensor": where,
            "differing_fraction": differing / max(1, total),
            "rel_l2": math.sqrt(diff2) / math.sqrt(na) if na > 0 else float("nan"), "tensors": len(names)}


def ties_threshold_stats(base_dir: Path, expert_dirs: list[Path], density: float, max_tensors: int = 6) -> dict:
    """Why TIES outputs differ from mergekit's beyond arithmetic: on bf16 checkpoints, task-vector
    magnitudes take few distinct values, so many entries tie with the k-th largest. mergeline keeps
    every tied entry (k = round(density * n), ties included); mergekit's argsort keeps exactly
    int(density * n), breaking ties arbitrarily. Measured on a few of the largest matrices."""
    base = _Reader(base_dir)
    experts = [_Reader(d) for d in expert_dirs]
    names = sorted((n for n in base.map if n.endswith("weight")),
                   key=lambda n: -base.get(n).numel())[:max_tensors]
    tied = kept_ml = kept_mk = total = 0
    for name in names:
        b = base.get(name).float().reshape(-1)
        n = b.numel()
        for e in experts:
            mag = (e.get(name).float().reshape(-1) - b).abs_()
            k = keep_count(density, n)
            thr = torch.kthvalue(mag, n - k + 1).values
            tied += int((mag == thr).sum())
            kept_ml += int((mag >= thr).sum())
            kept_mk += max(1, int(density * n))
            total += n
    return {"tensors": names, "tied_fraction": tied / total, "kept_mergeline": kept_ml / total,
            "kept_mergekit": kept_mk / total}
