"""The benchmark's results as Markdown, and their place in docs/benchmarks.md (between markers)."""

from __future__ import annotations

import statistics
from pathlib import Path

BEGIN = "<!-- bench:begin (written by `make bench`; edit the text outside these markers) -->"
END = "<!-- bench:end -->"
GB = 1e9
GIB = 2**30

# (method, minimum speedup over mergekit) from the issue that set the targets
SPEED_TARGETS = {"ties": 10.0, "linear": 3.0, "task_arithmetic": 3.0, "dare_ties": 3.0}
RSS_TARGET = 1 / 3       # mergeline's peak RSS at most a third of mergekit's
SCALE_RSS_TARGET = 1.2   # doubling the model grows peak RSS by at most this
SCALE_RUNS = {"2x": "deeper", "2x-wide": "wider"}  # the scale runs' tags, and how each doubles the model


def _med(samples: list[dict], key: str) -> float | None:
    vals = [s[key] for s in samples if key in s]
    return statistics.median(vals) if vals else None


def _flow_merge(samples: list[dict]) -> float | None:
    vals = [sum(s["flow"].get(k, 0.0) for k in ("plan", "merge", "commit")) for s in samples if "flow" in s]
    return statistics.median(vals) if vals else None


def _f(x: float | None, fmt: str = ".1f", unit: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{unit}"


def _gib(x: float | None) -> str:
    return "–" if x is None else f"{x / GIB:.2f}"


def render(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"Run {m['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / GIB:.0f} GiB RAM, Linux "
        f"{m['kernel']}, Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads); "
        f"mergeline {m['commit'] or '(uncommitted)'}"
        + (f", mergekit {m['mergekit'].split()[0]} (torch {m['mergekit'].split()[-1]})" if m.get("mergekit") else "")
        + f". Load average {m['load_before']:.1f} before, {m.get('load_after', float('nan')):.1f} after "
        f"(other work shares this machine). Command: `{r['command']}` ({r['elapsed_s'] / 60:.0f} min).",
        "",
    ]
    sizes = r["sizes"]
    one = sizes.get("1x")
    if one:
        lines += _main_table(one, r)
        lines += _targets(r)
        lines += _compare_table(one)
    for tag, how in SCALE_RUNS.items():
        if tag in sizes and one:
            lines += _scale_table(one, sizes[tag], how)
    lines += _fixed_costs(r)
    return "\n".join(lines).rstrip() + "\n"


def _main_table(size: dict, r: dict) -> list[str]:
    sh = size["shape"]
    fl = size["floor"]
    methods = size["methods"]
    lin = methods.get("linear")
    lin_merge = _flow_merge(lin["mergeline"]) if lin else None
    out = [
        f"### {sh['params'] / 1e6:.0f}M parameters: a base and {_n_experts(r)} experts, bf16 "
        f"(hidden {sh['hidden']}, {sh['layers']} layers; largest tensor {sh['largest'] / 1e6:.1f}M)",
        "",
        f"Floor: reading all {fl['bytes'] / GB:.2f} GB of inputs once from the page cache takes "
        f"**{fl['seconds']:.2f} s** ({fl['gb_s']:.2f} GB/s, one thread)"
        + (f"; mergeline's linear merge (the cheapest method) takes **{lin_merge:.1f} s** inside the flow." if lin_merge
           else "."),
        "",
        "| method | mergeline wall s | merge s (in flow) | input GB/s | CPU s | peak RSS GiB "
        "| mergekit wall s | CPU s | peak RSS GiB | **speedup** | **RSS ml/mk** | merge ÷ read floor | merge ÷ linear |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for method, res in methods.items():
        ml, mk = res["mergeline"], res["mergekit"]
        w, merge = _med(ml, "wall_s"), _flow_merge(ml)
        mkw = _med(mk, "wall_s")
        rss, mkrss = _med(ml, "peak_rss"), _med(mk, "peak_rss")
        out.append(
            f"| {method} | {_f(w)} | {_f(merge)} | {_f(res['input_bytes'] / GB / w if w else None, '.2f')} "
            f"| {_f(_med(ml, 'cpu_s'))} | {_gib(rss)} | {_f(mkw)} | {_f(_med(mk, 'cpu_s'))} | {_gib(mkrss)} "
            f"| {_f(mkw / w if mkw and w else None, '.1f', '×')} | {_f(rss / mkrss if rss and mkrss else None, '.2f')} "
            f"| {_f(merge / fl['seconds'] if merge else None, '.1f', '×')} "
            f"| {_f(merge / lin_merge if merge and lin_merge else None, '.1f', '×')} |"
        )
    n = len(next(iter(methods.values()))["mergeline"]) if methods else 0
    out += [
        "",
        f"Medians of {n} run(s) per tool, the tools alternating. *wall*: the whole command, process start to exit; "
        "*merge (in flow)*: mergeline's own plan + merge + commit timings, without interpreter start, imports and "
        "Prefect; *input GB/s*: checkpoint bytes read (linear reads the experts only) over wall time; "
        "*speedup*: mergekit wall ÷ mergeline wall; *peak RSS*: the process's ru_maxrss (file pages it maps "
        "included; each command is started by a small launcher so it does not inherit the benchmark's own peak).",
    ]
    if "disk_linear" in size:
        d = size["disk_linear"]
        out += ["", f"The outputs above go to tmpfs (`/dev/shm`). With the output on this machine's disk, linear takes "
                f"{d['wall_s']:.1f} s wall ({_flow_merge([d]):.1f} s in flow): mergeline fsyncs every shard "
                "before publishing, mergekit does not."]
    return out + [""]


def _n_experts(r: dict) -> int:
    return r["args"]["experts"]


def _targets(r: dict) -> list[str]:
    sizes = r["sizes"]
    one = sizes["1x"]["methods"]
    out = []
    for method, target in SPEED_TARGETS.items():
        res = one.get(method)
        if not res or not res["mergekit"]:
            continue
        s = _med(res["mergekit"], "wall_s") / _med(res["mergeline"], "wall_s")
        out.append(f"- {method}: {s:.1f}× faster than mergekit (target ≥ {target:g}×) — "
                   f"{'met' if s >= target else '**missed**'}")
    for method, res in one.items():
        if res["mergekit"]:
            q = _med(res["mergeline"], "peak_rss") / _med(res["mergekit"], "peak_rss")
            out.append(f"- {method}: peak RSS {q:.2f} of mergekit's (target ≤ 0.33) — "
                       f"{'met' if q <= RSS_TARGET else '**missed**'}")
    for tag, how in SCALE_RUNS.items():
        two = sizes.get(tag, {}).get("methods", {})
        for method, res in one.items():
            if method in two:
                q = _med(two[method]["mergeline"], "peak_rss") / _med(res["mergeline"], "peak_rss")
                out.append(f"- {method}: doubling the model ({how}) grows peak RSS {q:.2f}× "
                           f"(target ≤ {SCALE_RSS_TARGET}×) — {'met' if q <= SCALE_RSS_TARGET else '**missed**'}")
    none = ["- none measured: the speed and memory targets need mergekit (`make bench-setup`), the scale "
            "targets the runs at twice the size (without --no-scale)"]
    return ["**Targets** (this machine, same files, same run):", "", *(out or none), ""]


def _compare_table(size: dict) -> list[str]:
    rows = [(m, r) for m, r in size["methods"].items() if "compare" in r]
    if not rows:
        return []
    out = [
        "**Outputs against mergekit's** (deterministic methods; task vector = merged − base):",
        "",
        "| method | task-vector cosine | max abs diff | weights differing | vs mergekit computing in float32: "
        "cosine | max abs diff | weights differing |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for method, res in rows:
        c = res["compare"]
        e = res.get("explain", {}).get("mergekit_fp32_vs_mergeline")
        out.append(
            f"| {method} | {c['cosine']:.6f} | {c['max_abs_diff']:.3g} | {100 * c['differing_fraction']:.2f}% | "
            + (f"{e['cosine']:.6f} | {e['max_abs_diff']:.3g} | {100 * e['differing_fraction']:.2f}% |" if e
               else "– | – | – |")
        )
    ties = size["methods"].get("ties", {}).get("explain", {}).get("ties_at_threshold")
    if ties:
        out += ["", f"TIES on these bf16 checkpoints: {100 * ties['tied_fraction']:.2f}% of task-vector entries tie "
                f"with the k-th largest magnitude (the {len(ties['tensors'])} largest matrices, every expert); "
                f"mergeline keeps all of them ({100 * ties['kept_mergeline']:.2f}% of entries kept), mergekit's "
                f"argsort exactly k ({100 * ties['kept_mergekit']:.2f}%)."]
    return out + [""]


def _scale_table(one: dict, two: dict, how_doubled: str) -> list[str]:
    s1, s2 = one["shape"], two["shape"]
    if s1["hidden"] == s2["hidden"]:
        how = f"{s1['layers']} → {s2['layers']} layers, same width, so the largest tensor is the same"
    else:
        how = (f"hidden {s1['hidden']} → {s2['hidden']}, {s1['layers']} → {s2['layers']} layers, so the largest "
               f"tensor grows {s1['largest'] / 1e6:.1f}M → {s2['largest'] / 1e6:.1f}M")
    out = [
        f"### Scale, {how_doubled}: {s1['params'] / 1e6:.0f}M → {s2['params'] / 1e6:.0f}M parameters "
        f"({s2['params'] / s1['params']:.2f}×: {how})",
        "",
        f"Read floor {one['floor']['seconds']:.2f} s → {two['floor']['seconds']:.2f} s.",
        "",
        "| method | wall s 1× → 2× | merge s (in flow) 1× → 2× | merge ratio | peak RSS GiB 1× → 2× | RSS ratio "
        "| mergekit wall s 1× → 2× | mergekit peak RSS GiB 1× → 2× |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for method, r2 in two["methods"].items():
        r1 = one["methods"].get(method)
        if not r1:
            continue
        w1, w2 = _med(r1["mergeline"], "wall_s"), _med(r2["mergeline"], "wall_s")
        f1, f2 = _flow_merge(r1["mergeline"]), _flow_merge(r2["mergeline"])
        m1, m2 = _med(r1["mergeline"], "peak_rss"), _med(r2["mergeline"], "peak_rss")
        mk = (f"{_f(_med(r1['mergekit'], 'wall_s'))} → {_f(_med(r2['mergekit'], 'wall_s'))}"
              if r2["mergekit"] and r1["mergekit"] else "–")
        mkr = (f"{_gib(_med(r1['mergekit'], 'peak_rss'))} → {_gib(_med(r2['mergekit'], 'peak_rss'))}"
               if r2["mergekit"] and r1["mergekit"] else "–")
        out.append(f"| {method} | {w1:.1f} → {w2:.1f} | {_f(f1)} → {_f(f2)} | {_f(f2 / f1 if f1 and f2 else None, '.2f', '×')} "
                   f"| {_gib(m1)} → {_gib(m2)} | {m2 / m1:.2f}× | {mk} | {mkr} |")
    return out + [""]


def _fixed_costs(r: dict) -> list[str]:
    p = r.get("prefect", {})
    out = ["**Fixed costs** (not merge work):", ""]
    st = r.get("startup", {})
    if st:
        tools = [f"{tool} {v['wall_s']:.1f} s" for tool, v in st.items()]
        out.append("- Start-up before any work (interpreter and the imports a merge needs; mergekit timed as "
                   "`mergekit-yaml --help`): " + ", ".join(tools) + ". Every wall time above includes it.")
    if "server" in p:
        s = p["server"]
        out.append(f"- An empty Prefect flow in a fresh interpreter, against the local Prefect server the timed runs "
                   f"use: {s['wall_s']:.1f} s ({s['import_s']:.1f} s of it importing prefect).")
    if "ephemeral" in p:
        e = p["ephemeral"]
        out.append(f"- The same with Prefect's ephemeral API (no `PREFECT_API_URL`, what a bare `mergeline merge` "
                   f"starts): {e['wall_s']:.1f} s — add about {e['wall_s'] - p.get('server', e)['wall_s']:.0f} s to "
                   "every mergeline wall time above if you run without a Prefect server.")
    return out + [""]


def write_docs(path: Path, md: str) -> None:
    """Replace the block between the markers (or append one) in docs/benchmarks.md."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    block = f"{BEGIN}\n\n{md}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
