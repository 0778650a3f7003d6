"""The result of a merge (or a dry run): what was planned, checked, written and measured."""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from dataclasses import asdict, dataclass, field
from itertools import chain
from operator import attrgetter
from typing import Dict, List, Optional


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} TB"


@dataclass
class FilePlan:
    """One output file: its path relative to the output root, tensor count and bytes."""

    name: str
    tensors: int
    bytes: int


@dataclass
class MergeReport:
    """Returned by :func:`fastsoup.merge` (``--json`` prints :meth:`to_dict`).

    Sizes are in bytes, times in seconds, RSS in bytes (the process's peak resident set,
    from ``getrusage``, which includes everything this process did before the merge).
    """

    output: str
    kind: str                               # "file", "dir" or "diffusers"
    dry_run: bool
    inputs: List[str]
    base: Optional[str]
    weights: List[float]                    # raw weights
    coefficients: List[float]               # effective coefficients of the inputs
    base_coefficient: Optional[float]
    normalize: bool
    key_policy: str
    accumulate: str
    dtype: Optional[str]
    device: str
    tensors: int
    tensors_summed: int
    tensors_copied: int
    files: List[FilePlan]
    bytes_to_read: int
    bytes_to_write: int
    memory_budget: int
    disk_free: Optional[int]
    dropped_keys: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    output_dtypes: Dict[str, int] = field(default_factory=dict)
    seconds: Optional[float] = None
    write_seconds: Optional[float] = None
    peak_rss: Optional[int] = None
    manifest: Optional[dict] = None
    sidecar: Optional[str] = None
    copied_files: List[str] = field(default_factory=list)
    work_items: Optional[int] = None        # tensors and chunks of large tensors
    kernel_calls: Optional[int] = None      # runs of work items summed in one _C call each
    window_bytes: Optional[int] = None      # input bytes mapped per prefetch window
    staging_bytes: Optional[int] = None     # size of each of the two output buffers
    timings: Dict[str, float] = field(default_factory=dict)  # where the streaming time went
    commit_warnings: List[str] = field(default_factory=list)  # problems after the commit
    #                                   (also in ``warnings``; printed even with -q)
    diagnostics: List[dict] = field(default_factory=list)  # every warning, grouped by cause,
    #                                   with all affected keys (``warnings`` has one line each)

    @property
    def throughput(self) -> Optional[float]:
        """Output bytes per second over the whole run (None for a dry run)."""
        if not self.seconds:
            return None
        return self.bytes_to_write / self.seconds

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = True
        d["throughput_bytes_per_s"] = self.throughput
        return d

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """Human-readable text (what the CLI prints without ``--json``)."""
        lines = []
        head = "dry run: would write" if self.dry_run else "wrote"
        lines.append(f"{head} {self.output} ({self.kind}, {len(self.files)} file"
                     f"{'s' if len(self.files) != 1 else ''}, {self.tensors} tensors, "
                     f"{human_bytes(self.bytes_to_write)})")
        for i, (p, c) in enumerate(zip(self.inputs, self.coefficients)):
            lines.append(f"  input {i + 1}: {p}  weight {self.weights[i]:g} -> coefficient {c:.6g}")
        if self.base:
            lines.append(f"  base: {self.base}  coefficient {self.base_coefficient:.6g}")
        lines.append(f"  keys: {self.key_policy}; summed {self.tensors_summed}, copied "
                     f"(integer/bool) {self.tensors_copied}, dropped {len(self.dropped_keys)}")
        lines.append("  dtypes out: " + ", ".join(f"{k} x{v}" for k, v in self.output_dtypes.items())
                     + f"; accumulate {self.accumulate}; device {self.device}")
        if self.dry_run:
            lines.append("  plan:")
            for f in self.files[:50]:
                lines.append(f"    {f.name}: {f.tensors} tensors, {human_bytes(f.bytes)}")
            if len(self.files) > 50:
                lines.append(f"    ... and {len(self.files) - 50} more files")
            lines.append(f"  estimate: read {human_bytes(self.bytes_to_read)}, write "
                         f"{human_bytes(self.bytes_to_write)} (disk free: "
                         f"{human_bytes(self.disk_free) if self.disk_free is not None else '?'}), "
                         f"streaming memory budget {human_bytes(self.memory_budget)}")
            lines.append("  validation: OK (headers, keys, shapes, dtypes, integer tensors)")
        else:
            lines.append(f"  time {self.seconds:.2f} s ({human_bytes(self.throughput or 0)}/s of "
                         f"output), peak RSS {human_bytes(self.peak_rss or 0)}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        if self.dropped_keys:
            shown = ", ".join(self.dropped_keys[:10])
            more = f" (+{len(self.dropped_keys) - 10} more)" if len(self.dropped_keys) > 10 else ""
            lines.append(f"  dropped keys: {shown}{more}")
        return "\n".join(lines)


def peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` on Linux (per address space,
    so not inherited across exec, unlike ``ru_maxrss``), else ``getrusage``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


_BEGIN, _END, _SHARED = attrgetter("info.begin"), attrgetter("info.end"), attrgetter("shared")


def disk_free(output: str) -> Optional[int]:
    """Free bytes on the filesystem of ``output``'s folder, or None when unknown."""
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(output))).free
    except OSError:
        return None


def plan_report(plan, output: str, options) -> MergeReport:
    """The report of a planned merge (a :class:`.plan.Plan` into ``output`` with
    :class:`.options.MergeOptions`): what will be read and written; a run fills in the
    rest with :func:`record_run`."""
    files = []
    summed = copied = to_read = 0
    for comp, f in plan.output_files():
        name = os.path.basename(output) if plan.kind == "file" else \
            "/".join(([comp.name] if comp.name else []) + [f.name])
        files.append(FilePlan(name, len(f.tensors), f.data_bytes))
        ops = list(map(attrgetter("op"), f.tensors))
        summed += ops.count("sum")
        copied += ops.count("copy")
        shared = list(map(_SHARED, f.tensors))
        srcs = list(chain.from_iterable(t.sources for t, sh in zip(f.tensors, shared) if sh is None))
        to_read += sum(map(_END, srcs)) - sum(map(_BEGIN, srcs))  # copies compare every input
        to_read += sum(len(sh[0].indices) * (sh[1].end - sh[1].begin)
                       for sh in shared if sh is not None)
    to_write = sum(fp.bytes for fp in files)
    free = disk_free(output)
    n = len(plan.input_weights)
    base_coef = 1.0 - sum(plan.coefficients) if plan.base_index is not None else None
    return MergeReport(
        output=os.path.abspath(output), kind=plan.kind, dry_run=options.dry_run,
        inputs=[lay.path for lay in plan.inputs[:n]],
        base=plan.inputs[plan.base_index].path if plan.base_index is not None else None,
        weights=list(plan.input_weights), coefficients=list(plan.coefficients),
        base_coefficient=base_coef, normalize=plan.normalize, key_policy=plan.key_policy,
        accumulate=options.accumulate, dtype=options.dtype, device=options.device,
        tensors=summed + copied, tensors_summed=summed, tensors_copied=copied, files=files,
        bytes_to_read=to_read, bytes_to_write=to_write,
        memory_budget=options.memory, disk_free=free, dropped_keys=list(plan.dropped_keys),
        warnings=list(plan.warnings), output_dtypes=plan.output_dtypes(),
        diagnostics=[d.to_dict() for d in plan.diagnostics])


def record_run(report: MergeReport, stats, *, seconds: float, write_seconds: float) -> None:
    """Fill in what a run measured: times, peak RSS and the engine's
    :class:`.engine.RunStats`."""
    report.write_seconds = write_seconds
    report.seconds = seconds
    report.peak_rss = peak_rss()
    report.work_items, report.window_bytes = stats.items, stats.window_bytes
    report.kernel_calls = getattr(stats, "runs", None)
    report.staging_bytes = stats.staging_bytes
    report.timings = {"stream": stats.seconds, "sum": stats.sum_seconds,
                      "prefetch_wait": stats.prefetch_wait_seconds,
                      "write_wait": stats.write_wait_seconds,
                      "finish": report.write_seconds or 0.0}
