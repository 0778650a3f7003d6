"""Shared helpers for fastsoup's pytest-benchmark suites.

* ``DEVICE``: cuda when present, else cpu.
* ``SIZE``: ``FASTSOUP_BENCH_SIZE`` = ``full`` (default on a GPU), ``small`` (default on
  CPU) or ``smoke`` (tiny shapes, for CI with ``--benchmark-disable``).
* :func:`measure`: runs a step function under ``benchmark.pedantic`` with device
  synchronisation, then records median, p20/p80 (seconds), effective GB/s for the bytes
  the op must move, and peak extra device memory in ``benchmark.extra_info``.
"""
from __future__ import annotations

import os
import statistics
from typing import Callable, Optional

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = os.environ.get("FASTSOUP_BENCH_SIZE", "full" if DEVICE.type == "cuda" else "small")
if SIZE not in ("full", "small", "smoke"):
    raise ValueError(f"FASTSOUP_BENCH_SIZE must be full, small or smoke, got {SIZE!r}")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _quantile(data, q):
    data = sorted(data)
    if not data:
        return float("nan")
    pos = q * (len(data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def measure(benchmark, step: Callable[[], None], *, bytes_moved: Optional[int] = None,
            rounds: Optional[int] = None, warmup: int = 3, **info) -> None:
    """Time ``step`` (synchronised) and fill ``benchmark.extra_info``."""
    if rounds is None:
        rounds = {"full": 50, "small": 10, "smoke": 1}[SIZE]
    if SIZE == "smoke":
        warmup = min(warmup, 1)
    for _ in range(warmup):
        step()
    sync()
    base_mem = 0
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()

    def timed():
        step()
        sync()

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    extra = dict(info)
    extra["device"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    extra["torch"] = torch.__version__
    stats = getattr(benchmark, "stats", None)
    data = list(getattr(getattr(stats, "stats", None), "data", []) or [])
    if data:
        med = statistics.median(data)
        extra["median_s"] = med
        extra["p20_s"] = _quantile(data, 0.2)
        extra["p80_s"] = _quantile(data, 0.8)
        if bytes_moved:
            extra["bytes_moved"] = int(bytes_moved)
            extra["effective_GBps"] = bytes_moved / med / 1e9
    if DEVICE.type == "cuda":
        extra["peak_extra_mem_MiB"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    benchmark.extra_info.update(extra)
