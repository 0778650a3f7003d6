#!/usr/bin/env python
"""Run fastsoup's benchmark suites and write a measured report.

    python benchmarks/report.py                      # every suite that fits this machine
    python benchmarks/report.py --suites per_sample_mse --size small
    python benchmarks/report.py --update-readme      # only regenerate README's table section

Writes ``benchmarks/results/<device>-<date>.md`` and ``.json``: per benchmark group a
table of median time (p20–p80), effective bandwidth, speed-up against the group's
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
generated from the committed results files, newest per device.
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
                "backend": info.get("backend", ""),
                "role": _role(b),
                "median_ms": st["median"] * 1e3,
                "p20_ms": p20 * 1e3,
                "p80_ms": p80 * 1e3,
                "rounds": st.get("rounds"),
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


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def to_markdown(meta: dict, table: Dict[str, List[dict]]) -> str:
    lines = [f"# fastsoup benchmarks: {meta['device']}", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             f"- size preset: `{meta['size']}`",
             *( [f"- groups not re-measured in this run are kept from the run of "
                 f"{meta['kept_groups_from'].get('date')} (`{meta['kept_groups_from'].get('command')}`)"]
                if meta.get("kept_groups_from") else []),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- machine: {meta['machine']}",
             f"- load average (1/5/15 min): {_fmt_load(meta.get('load_average'))} "
             "(other work on the machine makes timings noisy)",
             *(["- **smoke run**: tiny shapes and few rounds; the p20–p80 ranges are not a "
                "measured spread"] if meta.get("size") == "smoke" else []), "",
             "Median of the timed rounds, with p20–p80. GB/s counts the bytes the operation "
             "must move. *vs baseline*: speed-up over the group's baseline (how users write it "
             "today). *model ms*: the bytes it must move at the device's copy bandwidth "
             "(a large `copy_`, measured in the same run: see the group's note). "
             "*of ceiling*: model ms / median where a model exists, else the fraction of the "
             "group's ceiling row (copy or I/O floor). "
             "*peak MiB*: extra GPU memory during the op (GPU runs) or the merge process's "
             "peak resident set (merges).",
             ""]
    for group, rows in table.items():
        lines += [f"## {group}", ""]
        copy = [r["copy_GBps"] for r in rows if r.get("copy_GBps")]
        if copy:
            lines += [f"Model: bytes / {copy[0]:.1f} GB/s (measured copy bandwidth).", ""]
        lines += ["| impl | backend | median ms | p20–p80 ms | GB/s | vs baseline | model ms | of ceiling | peak MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            impl = r["impl"] + (f" ({r['role']})" if r["role"] else "")
            lines.append(
                f"| {impl} | {r['backend'] or '-'} | {r['median_ms']:.3f} | "
                f"{r['p20_ms']:.3f}–{r['p80_ms']:.3f} | {_fmt(r['GBps'], '.1f')} | "
                f"{_fmt(r['speedup_vs_baseline'], '.2f') + '×' if r['speedup_vs_baseline'] else '-'} | "
                f"{_fmt(r.get('model_ms'), '.3f')} | "
                f"{_fmt(r['fraction_of_ceiling'] * 100 if r['fraction_of_ceiling'] else None, '.0f') + '%' if r['fraction_of_ceiling'] else '-'} | "
                f"{_fmt(r['peak_extra_MiB'], '.1f')} |")
        lines.append("")
    return "\n".join(lines)


README_START = "<!-- perf:start -->"
README_END = "<!-- perf:end -->"


def update_readme() -> bool:
    """Regenerate README's performance section from benchmarks/results/*.json."""
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        print("README.md has no perf markers; nothing to update", file=sys.stderr)
        return False
    latest: Dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data.get("table"), dict) or "device" not in data.get("meta", {}):
            continue  # another tool's results (e.g. bench_host_cost.py), not a report run
        meta = data.get("meta", {})
        dev = meta.get("device", os.path.basename(path))
        if dev not in latest or meta.get("date", "") >= latest[dev]["meta"].get("date", ""):
            data["_file"] = os.path.relpath(path, ROOT)
            latest[dev] = data
    parts = [README_START, ""]
    if not latest:
        parts.append("No benchmark results have been committed yet.")
    for dev, data in sorted(latest.items()):
        meta = data["meta"]
        parts += [f"### {dev} ({meta['date']})", "",
                  f"From `{data['_file']}`; versions: "
                  + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
                  + f"; command: `{meta['command']}`.", "",
                  ("On CPU, rows whose backend is `reference` measure the PyTorch reference "
                   "(the fused loss kernels are GPU kernels), rows marked `_C` fastsoup's CPU "
                   "kernel; merging and `weighted_sum_` run fastsoup's C++ kernels. "
                   "Full table: `"
                   + data["_file"][:-5] + ".md`.\n") if dev.startswith("cpu") else
                  f"Full table: `{data['_file'][:-5]}.md`.\n",
                  "| group | fastsoup impl (fastest; merges: the first merge) | median ms | vs baseline | of ceiling |",
                  "|---|---|---:|---:|---:|"]
        for group, rows in data["table"].items():
            ours = [r for r in rows if r["impl"].startswith("fastsoup")]
            if not ours:
                continue
            r = _readme_row(group, ours)
            sp = f"{r['speedup_vs_baseline']:.2f}×" if r.get("speedup_vs_baseline") else "-"
            fc = f"{r['fraction_of_ceiling'] * 100:.0f}%" if r.get("fraction_of_ceiling") else "-"
            parts.append(f"| {group} | {r['impl']} ({r['backend'] or '-'}) | {r['median_ms']:.3f} | {sp} | {fc} |")
        parts.append("")
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
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per suite")
    ap.add_argument("--keep-other-groups", action="store_true",
                    help="keep the groups of an existing results file of the same device and "
                         "date that this run does not measure (re-run some suites only)")
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
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{_slug(device)}-{date}")
    if args.keep_other_groups and os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            old = json.load(f)
        kept = {g: rows for g, rows in old.get("table", {}).items() if g not in table}
        if kept:
            meta["kept_groups_from"] = old.get("meta", {})
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
