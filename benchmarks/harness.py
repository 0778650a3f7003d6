"""Shared helpers for fastsoup's pytest-benchmark suites.

* ``DEVICE``: cuda when present, else cpu.
* ``SIZE``: ``FASTSOUP_BENCH_SIZE`` = ``full`` (default on a GPU), ``small`` (default on
  CPU) or ``smoke`` (tiny shapes, for CI with ``--benchmark-disable``).
* :func:`measure`: runs a step function under ``benchmark.pedantic`` with device
  synchronisation, then records median, p20/p80 (seconds), effective GB/s for the bytes
  the op must move, the modelled time of those bytes at the device's copy bandwidth, and
  peak extra device memory in ``benchmark.extra_info``.
* :func:`copy_bandwidth`: the device's copy bandwidth, measured once per process.

The ceiling model. A row that declares ``bytes_moved`` (the least traffic the op must do:
every input read and every output written as often as the fused algorithm needs) gets
``model_s = bytes_moved / copy_bandwidth()``: the time of a memory-bound op that ran at the
speed of ``dst.copy_(src)`` over a large buffer (``copy_bytes()`` per tensor, far above the
last-level cache; reads and writes both counted, as for the op). ``report.py`` prints it
and ``model_s / median_s`` as "of ceiling", so a GPU run reads as a fraction of what the
memory system allows, measured on the same device in the same run. Small shapes that fit in
a CPU cache can exceed 100%: the model is DRAM bandwidth.
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


def copy_bytes() -> int:
    """Bytes of each of the copy benchmark's two buffers: ``FASTSOUP_BENCH_COPY_MB``, else
    1 GiB on a GPU, 256 MiB on a CPU, 16 MiB at smoke size."""
    env = os.environ.get("FASTSOUP_BENCH_COPY_MB")
    if env:
        return int(float(env) * 2**20)
    if SIZE == "smoke":
        return 16 * 2**20
    return (1024 if DEVICE.type == "cuda" else 256) * 2**20


_COPY = {}


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write counted): median of timed
    ``dst.copy_(src)`` over :func:`copy_bytes` float32 buffers on ``DEVICE``. CUDA:
    device-to-device, timed with CUDA events; CPU: a memcpy-like copy at the current torch
    thread count, timed with ``perf_counter``. Measured once per process and cached."""
    if "bw" in _COPY:
        return _COPY["bw"]
    import time

    n = copy_bytes() // 4
    src = torch.ones(n, dtype=torch.float32, device=DEVICE)
    dst = torch.zeros_like(src)
    rounds = 3 if SIZE == "smoke" else (20 if DEVICE.type == "cuda" else 7)
    for _ in range(2):
        dst.copy_(src)
    sync()
    times = []
    for _ in range(rounds):
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    _COPY["bw"] = 2 * n * 4 / statistics.median(times)
    _COPY["bytes"] = n * 4
    return _COPY["bw"]


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
    if DEVICE.type == "cuda":  # read before copy_bandwidth() allocates its buffers
        extra["peak_extra_mem_MiB"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
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
            bw = copy_bandwidth()
            extra["copy_GBps"] = bw / 1e9
            extra["copy_buffer_MiB"] = _COPY["bytes"] / 2**20
            extra["model_s"] = bytes_moved / bw
    benchmark.extra_info.update(extra)
