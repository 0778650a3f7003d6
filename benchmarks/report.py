#!/usr/bin/env python
"""Run fastsoup's benchmark suites and write a measured report.

    python benchmarks/report.py                      # every suite that fits this machine
    python benchmarks/report.py --suites per_sample_mse --size small
    python benchmarks/report.py --suites train_step --name cpu-2core-2026-11-29b --keep-other-groups
    python benchmarks/report.py --update-readme      # only regenerate README's table section

Writes ``benchmarks/results/<device>-<date>.md`` and ``.json`` (or ``--name``): per
benchmark group a table of median time (p20–p80; ``-`` for a row timed once), effective
bandwidth, speed-up against the group's
baseline (the way users write it today), the modelled time of the row's bytes at the
device's measured copy bandwidth and the fraction of the ceiling (that model where the row
has one, else the group's ``copy``/``floor`` row, e.g. the I/O floor for merging), with
peak extra memory. Conventions the suites
follow: ``benchmark.extra_info["impl"]`` names the implementation, ``extra_info["role"]``
is ``"baseline"`` or ``"ceiling"`` where it applies (``eager`` and ``copy``/``floor``
are recognised without it), ``extra_info["effective_GBps"]`` and ``median_s`` come from
``benchmarks/harness.py``, with ``model_s`` (``bytes_moved`` / measured copy bandwidth) and
``copy_GBps`` for rows that declare the bytes they move.

The README's performance section (between the ``perf:start``/``perf:end`` markers) is
generated from the committed results files: per device the newest report run (one line per
group: the fastest fastsoup row; every fastsoup loss of a training step; ``fs.weighted_sum_``
and the ``_C`` kernel loop; each row's ``extra_info["label"]`` says what it is), then the
newest warm SD-like ``bench_merge.py --run`` results (``cpu-merge-*-sd-*.json``) as a compact
table of the floor, fastsoup's merges, the naive loop and the peers, in process and as whole
commands, a row faster than its floor flagged.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# suite name -> benchmark file; suites whose file does not exist are skipped
SUITES = {
    "per_sample_mse": "bench_per_sample_mse.py",
    "ambient": "bench_ambient.py",
    "weighted_sum": "bench_weighted_sum.py",
    "merge": "bench_merge.py",
    "train_step": "bench_train_step.py",
    "dispatch": "bench_dispatch.py",
}
BASELINE_IMPLS = ("eager", "naive", "foreach")
CEILING_IMPLS = ("copy", "floor", "io-floor", "io_floor")


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    return f"cpu-{os.cpu_count()}core"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _versions() -> Dict[str, str]:
    v = {"python": platform.python_version()}
    for mod in ("torch", "triton", "fastsoup", "safetensors", "numpy"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = "-"
    try:
        import torch

        v["cuda"] = torch.version.cuda or "-"
    except Exception:
        pass
    return v


def run_suite(path: str, size: str, timeout: float, extra_args: List[str]) -> Optional[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
               "--benchmark-only", f"--benchmark-json={out}"] + extra_args
        env = dict(os.environ, FASTSOUP_BENCH_SIZE=size)
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            print(f"  {os.path.basename(path)}: timed out after {timeout:.0f} s", file=sys.stderr)
            return None
        tail = "\n".join(proc.stdout.strip().splitlines()[-3:])
        print(f"  {os.path.basename(path)}: {time.time() - t0:.0f} s, exit {proc.returncode}: {tail}")
        if proc.returncode not in (0, 5) or not os.path.exists(out):
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            return None
        with open(out) as f:
            return json.load(f)


# What a row is, for results files written before the suites recorded
# ``extra_info["label"]`` (bench_weighted_sum.py and bench_train_step.py now do).
KNOWN_LABELS = {
    "weighted_sum": {
        "fastsoup": "`fs.weighted_sum_` (the public API)",
        "fastsoup-cuda": "`fs.weighted_sum_` (the public API) on the CUDA kernel",
        "cpu-C": "`fastsoup._C.weighted_sum` per tensor, no checks (the merge engine's kernel, "
                 "not the public API)",
        "foreach": "`torch._foreach_mul` / `_foreach_add_` in fp32, then a cast",
    },
    "train step": {
        "eager": "diffusers' `F.mse_loss(pred.float(), target.float())`",
        "fastsoup-mse": "`fs.per_sample_mse(pred, target).mean()`",
        "fastsoup-agc": "`fs.agc_loss(pred, target, exclude_fraction=0.125)` (top-k exclusion)",
    },
}


def _known_label(group: str, impl: str) -> str:
    for prefix, labels in KNOWN_LABELS.items():
        if group.startswith(prefix):
            return labels.get(impl, "")
    return ""


def _role(b: dict) -> str:
    info = b.get("extra_info", {})
    if info.get("role"):
        return info["role"]
    impl = info.get("impl", "")
    if impl in CEILING_IMPLS:
        return "ceiling"
    if impl in BASELINE_IMPLS:
        return "baseline"
    return ""


def summarise(benchmarks: List[dict]) -> Dict[str, List[dict]]:
    """Group rows with ratios against each group's baseline and ceiling."""
    groups: Dict[str, List[dict]] = {}
    for b in benchmarks:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    table: Dict[str, List[dict]] = {}
    for group, items in sorted(groups.items()):
        base = [b for b in items if _role(b) == "baseline"]
        ceil = [b for b in items if _role(b) == "ceiling"]
        base_t = base[0]["stats"]["median"] if base else None
        ceil_bw = ceil[0].get("extra_info", {}).get("effective_GBps") if ceil else None
        ceil_t = ceil[0]["stats"]["median"] if ceil else None
        rows = []
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            info = b.get("extra_info", {})
            st = b["stats"]
            model_s = info.get("model_s")
            data = sorted(st.get("data") or [st["median"]])
            p20 = info.get("p20_s", data[int(0.2 * (len(data) - 1))])
            p80 = info.get("p80_s", data[int(0.8 * (len(data) - 1))])
            bw = info.get("effective_GBps")
            rows.append({
                "impl": info.get("impl", b["name"]),
                "label": info.get("label") or _known_label(group, info.get("impl", b["name"])),
                "backend": info.get("backend", ""),
                "role": _role(b),
                "median_ms": st["median"] * 1e3,
                "p20_ms": p20 * 1e3,
                "p80_ms": p80 * 1e3,
                "rounds": st.get("rounds") or len(st.get("data") or []) or None,
                "GBps": bw,
                "speedup_vs_baseline": (base_t / st["median"]) if base_t else None,
                "model_ms": model_s * 1e3 if model_s else None,
                "copy_GBps": info.get("copy_GBps"),
                "fraction_of_ceiling": fraction_of_ceiling(b, model_s, bw, ceil_bw, ceil_t),
                "peak_extra_MiB": info.get("peak_extra_mem_MiB", info.get("peak_rss_MiB")),
                "name": b["name"],
            })
        table[group] = rows
    return table


def fraction_of_ceiling(b: dict, model_s, bw, ceil_bw, ceil_t):
    """``model_s / median`` when the row carries the copy-bandwidth model (every row that
    declares its bytes, the ceiling rows included: a small copy that fits in a cache can
    beat DRAM bandwidth); else the group's ceiling row: bandwidth ratio, or time ratio
    for rows without bytes (the merge's I/O floor). None for the ceiling row itself."""
    median = b["stats"]["median"]
    if model_s and median:
        return model_s / median
    if _role(b) == "ceiling":
        return None
    if bw and ceil_bw:
        return bw / ceil_bw
    if ceil_t and not bw:
        return ceil_t / median
    return None


def _fmt_load(la) -> str:
    """``{"before": (1, 5, 15), "after": (...)}`` as ``before 3.20 / 3.10 / 2.90, after ...``."""
    if not isinstance(la, dict):
        return "-" if la is None else str(la)
    parts = []
    for when in ("before", "after"):
        v = la.get(when)
        if v:
            parts.append(f"{when} " + " / ".join(f"{x:.2f}" for x in v))
    return ", ".join(parts) or "-"


def _readme_row(group: str, ours: List[dict]) -> dict:
    """The row README shows for a group: the fastest fastsoup row, except for merges,
    where it is the first merge (digests computed: what a user's first run costs)."""
    if group.startswith("merge"):
        first = [r for r in ours if r["impl"] == "fastsoup"]
        if first:
            return first[0]
    return min(ours, key=lambda r: r["median_ms"])


# groups whose README line shows more than the fastest fastsoup row: every fastsoup row of
# a training step (one per loss, each against the same baseline), and for weighted_sum the
# public API next to the raw kernel it calls (so the API's per-call cost shows)
README_ALL_OURS = ("train step",)
README_EXTRA_IMPLS = {"weighted_sum": ("cpu-C",)}


def _readme_rows(group: str, rows: List[dict]) -> List[dict]:
    """The rows README shows for a group (in the table's order: fastest first)."""
    extra = next((impls for prefix, impls in README_EXTRA_IMPLS.items()
                  if group.startswith(prefix)), ())
    ours = [r for r in rows if r["impl"].startswith("fastsoup") or r["impl"] in extra]
    if not ours:
        return []
    if group.startswith(README_ALL_OURS) or extra:
        return sorted(ours, key=lambda r: r["median_ms"])
    return [_readme_row(group, [r for r in ours if r["impl"].startswith("fastsoup")] or ours)]


def _label_of(group: str, r: dict) -> str:
    return r.get("label") or _known_label(group, r["impl"])


def _impl_cell(group: str, r: dict) -> str:
    label = _label_of(group, r)
    return r["impl"] + (f" = {label}" if label else "")


def _one_round(r: dict) -> bool:
    return r.get("rounds") is not None and r["rounds"] < 2


def _below_floor(rows: List[dict]) -> set:
    """Names of rows faster than their group's floor row (a time floor such as the merge's
    I/O floor): such a floor does not bound the work, and the table says so."""
    floors = [r for r in rows if r["impl"] in ("floor", "io-floor", "io_floor")]
    if not floors:
        return set()
    return {r["name"] for r in rows if r is not floors[0] and r["median_ms"] < floors[0]["median_ms"]}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def to_markdown(meta: dict, table: Dict[str, List[dict]]) -> str:
    lines = [f"# fastsoup benchmarks: {meta['device']}", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             f"- size preset: `{meta['size']}`",
             *( ["- groups not re-measured in this run are kept from "
                 + (f"`{meta['kept_groups_from']['file']}`, " if meta["kept_groups_from"].get("file") else "")
                 + f"the run of {meta['kept_groups_from'].get('date')} "
                 f"(`{meta['kept_groups_from'].get('command')}`, load average "
                 f"{_fmt_load(meta['kept_groups_from'].get('load_average'))}); each group's "
                 "heading gives the date it was measured"]
                if meta.get("kept_groups_from") else []),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- machine: {meta['machine']}",
             f"- load average (1/5/15 min): {_fmt_load(meta.get('load_average'))} "
             "(other work on the machine makes timings noisy)",
             *(["- **smoke run**: tiny shapes and one round per row; no p20–p80 spread is "
                "measured (the tables print `-`)"] if meta.get("size") == "smoke" else []), "",
             "Median of the timed rounds, with p20–p80 (`- (1 round)` where a row was timed "
             "once: one round has no spread). GB/s counts the bytes the operation "
             "must move. *vs baseline*: speed-up over the group's baseline (how users write it "
             "today). *model ms*: the bytes it must move at the device's copy bandwidth "
             "(a large `copy_`, measured in the same run: see the group's note). "
             "*of ceiling*: model ms / median where a model exists, else the fraction of the "
             "group's ceiling row (copy or I/O floor). "
             "*peak MiB*: extra GPU memory during the op (GPU runs) or the merge process's "
             "peak resident set (merges).",
             ""]
    dates = meta.get("group_dates") or {}
    for group, rows in table.items():
        measured = dates.get(group)
        lines += [f"## {group}" + (f" (measured {measured}, kept)" if measured and measured != meta["date"] else ""), ""]
        labels = [(r["impl"], _label_of(group, r)) for r in rows if _label_of(group, r)]
        if labels:
            lines += ["Rows: " + "; ".join(f"`{impl}` = {label}" for impl, label in labels) + ".", ""]
        copy = [r["copy_GBps"] for r in rows if r.get("copy_GBps")]
        if copy:
            lines += [f"Model: bytes / {copy[0]:.1f} GB/s (measured copy bandwidth).", ""]
        beaten = _below_floor(rows)
        lines += ["| impl | backend | median ms | p20–p80 ms | GB/s | vs baseline | model ms | of ceiling | peak MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            impl = r["impl"] + (f" ({r['role']})" if r["role"] else "")
            spread = "- (1 round)" if _one_round(r) else f"{r['p20_ms']:.3f}–{r['p80_ms']:.3f}"
            fc = r["fraction_of_ceiling"]
            fc = f"{fc * 100:.0f}%" if fc else "-"
            if r["name"] in beaten:
                fc += " (below the floor: the floor is wrong)"
            lines.append(
                f"| {impl} | {r['backend'] or '-'} | {r['median_ms']:.3f} | "
                f"{spread} | {_fmt(r['GBps'], '.1f')} | "
                f"{_fmt(r['speedup_vs_baseline'], '.2f') + '×' if r['speedup_vs_baseline'] else '-'} | "
                f"{_fmt(r.get('model_ms'), '.3f')} | {fc} | "
                f"{_fmt(r['peak_extra_MiB'], '.1f')} |")
        if beaten:
            lines += ["", "A row is faster than the floor: that floor does not measure the least "
                      "work the operation must do, so the fractions above are not bounds."]
        lines.append("")
    return "\n".join(lines)


README_START = "<!-- perf:start -->"
README_END = "<!-- perf:end -->"


def latest_reports(folder: str) -> Dict[str, dict]:
    """The newest report results file per device in ``folder`` (by ``meta.date``, then
    file name), with ``_file`` set to its path relative to the repository root. JSON files
    of other tools (no report ``table``: bench_merge.py, bench_host_cost.py) are skipped."""
    latest: Dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data.get("table"), dict) or "device" not in data.get("meta", {}):
            continue  # another tool's results (e.g. bench_host_cost.py), not a report run
        meta = data["meta"]
        dev = meta["device"]
        if dev not in latest or meta.get("date", "") >= latest[dev]["meta"].get("date", ""):
            data["_file"] = os.path.relpath(path, ROOT)
            latest[dev] = data
    return latest


# bench_merge.py --run results shown in README: the newest warm SD-like run. Its variants
# (cold cache, MoE-like key counts, merge methods, other layouts, memory limits, budget
# sweeps at another size) are listed by file, not mixed into the table.
MERGE_GLOB = "cpu-merge-*-sd-*.json"
MERGE_VARIANTS = ("cold", "moe", "methods", "llama", "memlimit", "mem", "gc", "budget")
# (row label, bench_merge row names that are this row: in-process, whole command)
MERGE_ROWS = [
    ("I/O floor (read every input, write + fsync the output)", ("floor",)),
    ("fastsoup, first merge (sha256 digests computed)",
     ("fastsoup (first merge)", "fastsoup-merge (first merge)")),
    ("fastsoup, digests cached", ("fastsoup (digests cached)", "fastsoup-merge (digests cached)")),
    ("fastsoup, `--hash none`", ("fastsoup (hash none)", "fastsoup-merge --hash none")),
    ("naive `safe_open` + `add_` loop", ("naive",)),
]
MERGE_PEERS = ("mergekit", "sd-mecha")
MERGE_KINDS = ("in-process", "command")


def _is_merge_variant(path: str) -> bool:
    tokens = os.path.basename(path)[:-len(".json")].split("-sd-", 1)[-1].split("-")
    return any(t in MERGE_VARIANTS for t in tokens)


def latest_merge(folder: str) -> Optional[dict]:
    """The newest warm SD-like ``bench_merge.py --run`` results in ``folder`` (by
    ``meta.date``, then file name), with ``_file`` set; None without one."""
    best = None
    for path in sorted(glob.glob(os.path.join(folder, MERGE_GLOB))):
        if _is_merge_variant(path):
            continue
        with open(path) as f:
            data = json.load(f)
        meta = data.get("meta", {})
        if not isinstance(data.get("rows"), dict) or meta.get("layout", "sd") != "sd" \
                or str(meta.get("cache_text", "")).startswith("cold") or meta.get("memory_limit"):
            continue
        data["_file"] = os.path.relpath(path, ROOT)
        if best is None or str(meta.get("date", "")) >= str(best["meta"].get("date", "")):
            best = data
    return best


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:200]


def merge_section(data: dict) -> List[str]:
    """README lines for one ``bench_merge.py --run`` results file: the floor, fastsoup's
    first / cached / unhashed merges, the naive loop and the peers present, each in process
    and as a whole command, against the floor of the same kind; a row faster than its floor
    is flagged. Rows missing from the file read "not in this run", skipped ones "not
    measured", failed ones "failed"; rows this table does not show are named."""
    meta = data.get("meta", {})
    rows = data.get("rows", {})
    skipped = data.get("skipped", {}) or {}
    by = {(r.get("name"), r.get("kind")): r for r in rows.values()}
    rounds = meta.get("rounds")

    def ok(r):
        return r is not None and not r.get("error") and r.get("times")

    floors = {k: _median(by[("floor", k)]["times"]) for k in MERGE_KINDS if ok(by.get(("floor", k)))}
    table = [("I/O floor" if lbl.startswith("I/O") else lbl, lbl, names) for lbl, names in MERGE_ROWS]
    table += [(p, p, (p,)) for p in MERGE_PEERS
              if p in skipped or any(n == p for n, _ in by)]
    shown, beaten, notes = set(), [], []
    out = []
    for short, label, names in table:
        cells, rss = [], None
        for kind in MERGE_KINDS:
            r = next((by[(n, kind)] for n in names if (n, kind) in by), None)
            if r is not None:
                shown.add((r["name"], kind))
            if r is None:
                if any(n in skipped for n in names):
                    cells += ["not measured", ""]
                elif short in MERGE_PEERS and kind == "in-process":
                    cells += ["-", ""]  # peers run as their users run them: commands
                else:
                    cells += ["not in this run", ""]
                continue
            if not ok(r):
                cells += ["failed", ""]
                notes.append(f"{short} ({'whole command' if kind == 'command' else kind}) failed: "
                             f"`{_last_line(r.get('error') or 'no timed round')}` (the full "
                             "table has the error and any notes on it)")
                continue
            med = _median(r["times"])
            fl = floors.get(kind)
            if r["name"] == "floor":
                ratio = "1.00"
            elif fl:
                ratio = f"{med / fl:.2f}"
                if med < fl:
                    ratio = f"**{ratio}: below the floor**"
                    beaten.append((short, kind, med, fl))
            else:
                ratio = "- (no floor)"
            cells += [f"{med:.3f}" + (" (1 round)" if len(r["times"]) < 2 else ""), ratio]
            if kind == "command":
                m = _median([x for x in r.get("rss", []) if x])
                rss = f"{m / 1e6:.0f}" if m else None
        for p in names:
            if p in skipped:
                notes.append(f"{short}: not measured: {skipped[p]}")
        out.append(f"| {label} | " + " | ".join(c or "" for c in cells) + f" | {rss or '-'} |")
    la = _fmt_load(meta.get("load_average"))
    rounds_text = ("One round (no spread)" if rounds is not None and rounds < 2 else
                   f"Medians of {rounds} interleaved rounds" if rounds else "Medians")
    lines = [f"### fastsoup-merge, {meta.get('layout_text', 'SD-like inputs')} ({meta.get('date', '?')})", "",
             f"From `{data['_file']}` (`benchmarks/bench_merge.py --run`; full table with "
             f"spreads, CPU time and notes: `{data['_file'][:-5]}.md`). {rounds_text}; page "
             f"cache: {meta.get('cache_text', '?')}; "
             + (f"bytecode: {meta['bytecode']}; " if meta.get("bytecode") else "")
             + f"load average (1/5/15 min): {la}; machine: {meta.get('machine', '?')}.", "",
             "*× floor*: median / the floor's median of the same kind (in process against the "
             "floor in process, whole commands against the floor run as a fresh Python). "
             "*Whole command*: the command a user runs, process start and imports included, "
             "output fsynced. *Peak RSS*: of the whole command (GNU time); not measured in "
             "process. Peers run only as whole commands.", "",
             "| row | in process: median s | × floor | whole command: median s | × floor | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|", *out]
    if beaten:
        lines += ["", "**A floor is beaten**: " + "; ".join(
            f"{n} ({'whole command' if k == 'command' else k}) {m:.3f} s < floor {f:.3f} s"
            for n, k, m, f in beaten) + ". A floor that is beaten is not a floor: it does not "
            "measure the least the merge must do, so the × floor ratios of that kind are not "
            "bounds."]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    others = [f"{r['name']} ({'whole command' if r['kind'] == 'command' else r['kind']})"
              for r in rows.values() if (r.get("name"), r.get("kind")) not in shown]
    if others:
        lines += ["", "Other rows of this run, in the full table: " + ", ".join(f"`{o}`" for o in others) + "."]
    return lines


def _other_merge_runs(folder: str, shown: Optional[str]) -> List[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "cpu-merge-*.json"))):
        rel = os.path.relpath(path, ROOT)
        if rel == shown:
            continue
        try:
            with open(path) as f:
                meta = json.load(f).get("meta", {})
        except (OSError, ValueError):
            continue
        limit = meta.get("memory_limit")
        what = ", ".join(x for x in (meta.get("layout_text"), meta.get("cache_text", "").split(":")[0],
                                     f"{limit / 2**30:g} GiB memory limit" if limit else "",
                                     str(meta.get("date", ""))) if x)
        out.append(f"`{rel[:-5]}.md` ({what})")
    return out


def update_readme() -> bool:
    """Regenerate README's performance section from benchmarks/results/*.json."""
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        print("README.md has no perf markers; nothing to update", file=sys.stderr)
        return False
    latest = latest_reports(RESULTS)
    merge = latest_merge(RESULTS)
    parts = [README_START, ""]
    if not latest and not merge:
        parts.append("No benchmark results have been committed yet.")
    for dev, data in sorted(latest.items()):
        meta = data["meta"]
        dates = meta.get("group_dates") or {}
        kept = meta.get("kept_groups_from")
        drop_merge = bool(merge) and dev.startswith("cpu")
        parts += [f"### {dev} ({meta['date']})", "",
                  f"From `{data['_file']}`; versions: "
                  + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
                  + f"; command: `{meta['command']}`; size preset `{meta.get('size', '?')}`"
                  + f"; load average (1/5/15 min): {_fmt_load(meta.get('load_average'))}.", ""]
        if kept:
            parts += ["Groups this run did not measure are kept from "
                      + (f"`{kept['file']}`, " if kept.get("file") else "")
                      + f"the run of {kept.get('date')} (load average "
                      f"{_fmt_load(kept.get('load_average'))}); the *measured* column gives "
                      "each group's date.", ""]
        if meta.get("size") == "smoke":
            parts += ["**Smoke run**: tiny shapes, one round per row: not a measurement to quote.", ""]
        parts += [("On CPU, rows whose backend is `reference` measure the PyTorch reference "
                   "(the fused loss kernels are GPU kernels), rows marked `_C` fastsoup's CPU "
                   "kernel; merging and `weighted_sum_` run fastsoup's C++ kernels. "
                   "Full table: `" + data["_file"][:-5] + ".md`.") if dev.startswith("cpu") else
                  f"Full table: `{data['_file'][:-5]}.md`.", ""]
        if drop_merge and any(g.startswith("merge") for g in data["table"]):
            parts += ["The pytest-benchmark merge group of this file (in process only) is left "
                      "out here: the merge table below, from `bench_merge.py --run`, replaces "
                      "it; it stays in the full table.", ""]
        parts += ["| group | measured | fastsoup row (fastest; train step: each loss; weighted_sum: "
                  "the API and its kernel; merges: the first merge) | backend | median ms | vs baseline | of ceiling |",
                  "|---|---|---|---|---:|---:|---:|"]
        for group, rows in data["table"].items():
            if drop_merge and group.startswith("merge"):
                continue
            beaten = _below_floor(rows)
            label = group + (" (in-process pytest-benchmark)" if group.startswith("merge") else "")
            for r in _readme_rows(group, rows):
                sp = f"{r['speedup_vs_baseline']:.2f}×" if r.get("speedup_vs_baseline") else "-"
                fc = f"{r['fraction_of_ceiling'] * 100:.0f}%" if r.get("fraction_of_ceiling") else "-"
                if r["name"] in beaten:
                    fc += " (below the floor: the floor is wrong)"
                med = f"{r['median_ms']:.3f}" + (" (1 round)" if _one_round(r) else "")
                parts.append(f"| {label} | {dates.get(group, meta['date'])} | {_impl_cell(group, r)} | "
                             f"{r['backend'] or '-'} | {med} | {sp} | {fc} |")
        parts.append("")
    if merge:
        parts += merge_section(merge) + [""]
    others = _other_merge_runs(RESULTS, merge["_file"] if merge else None)
    if others:
        parts += ["Other merge runs (not in the table above: cold cache, MoE-like key counts, "
                  "merge methods, older runs): " + "; ".join(others) + ".", ""]
    parts.append(README_END)
    new = text[: text.index(README_START)] + "\n".join(parts) + text[text.index(README_END) + len(README_END):]
    with open(readme, "w") as f:
        f.write(new)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suites", default=",".join(SUITES),
                    help=f"comma list among {', '.join(SUITES)} (default: all present)")
    ap.add_argument("--size", choices=["full", "small", "smoke"], default=None,
                    help="size preset (default: full on a GPU, small on CPU)")
    ap.add_argument("--out", default=RESULTS, help="folder for the .md and .json results")
    ap.add_argument("--name", default=None,
                    help="file name of the results, without .md/.json (default: "
                         "<device>-<date>; pick another to keep a committed file of that name)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per suite")
    ap.add_argument("--keep-other-groups", action="store_true",
                    help="keep the groups that this run does not measure (re-run some suites "
                         "only) from the results file of the same name when it exists, else "
                         "from the newest results file of this device in --out; each group "
                         "keeps the date it was measured on")
    ap.add_argument("--update-readme", action="store_true",
                    help="only regenerate README's performance section from results files")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.update_readme:
        return 0 if update_readme() else 1

    import torch

    size = args.size or ("full" if torch.cuda.is_available() else "small")
    device = _device_name()
    benchmarks: List[dict] = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"fastsoup benchmark report on {device} (size {size})")
    for name in [s.strip() for s in args.suites.split(",") if s.strip()]:
        if name not in SUITES:
            ap.error(f"unknown suite {name!r}")
        path = os.path.join(HERE, SUITES[name])
        if not os.path.exists(path):
            print(f"  {SUITES[name]}: not present, skipped")
            continue
        data = run_suite(path, size, args.timeout, args.pytest_args)
        if data:
            benchmarks += data["benchmarks"]
    if not benchmarks:
        print("no benchmark ran", file=sys.stderr)
        return 1
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    meta = {
        "device": device, "date": date, "size": size, "versions": _versions(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "command": "python benchmarks/report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average": {"before": load_before,
                         "after": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    table = summarise(benchmarks)
    meta["group_dates"] = {g: date for g in table}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"{_slug(device)}-{date}")
    if args.keep_other_groups:
        old = None
        if os.path.exists(stem + ".json"):
            with open(stem + ".json") as f:
                old = json.load(f)
            old["_file"] = os.path.relpath(stem + ".json", ROOT)
        else:
            old = latest_reports(args.out).get(device)
        kept = {g: rows for g, rows in (old or {}).get("table", {}).items() if g not in table}
        if kept:
            old_meta = old.get("meta", {})
            meta["kept_groups_from"] = dict(old_meta, file=old.get("_file"))
            for g in kept:
                meta["group_dates"][g] = old_meta.get("group_dates", {}).get(g, old_meta.get("date"))
            table = dict(sorted({**kept, **table}.items()))
            benchmarks = [b for b in old.get("raw", []) if (b.get("group") or b["name"]) in kept] + benchmarks
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "table": table, "raw": benchmarks}, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(to_markdown(meta, table))
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
