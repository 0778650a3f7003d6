"""The merge's CPU sum kernel alone: ``fastsoup._C.weighted_sum`` on one thread.

    python benchmarks/sum_kernel.py [--inputs 8] [--kib 512,64] [--seconds 2]

For each size, ``--inputs`` bf16 inputs of that many KiB each (normal values, as weights
are; random bit patterns would add subnormals and NaNs) are summed into a bf16 output
for about ``--seconds``, the way the merge's slices are (8 inputs × 512 KiB: the default
4 MiB slice). Prints GB/s of input read and the time per call; then the cost of one call
with 8 elements (the per-call overhead). A diagnostic for the kernel, run in process with
whichever ``fastsoup`` is imported (``PYTHONPATH`` selects a build to compare); the
merge's own numbers come from ``bench_merge.py --run``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

BF16 = 2  # kernel dtype code (csrc/include/fastsoup_abi.h)


def bf16_normal(n: int, rng) -> np.ndarray:
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def throughput(ext, inputs: int, kib: int, seconds: float) -> tuple:
    rng = np.random.default_rng(0)
    n = kib * 1024 // 2
    xs = [bf16_normal(n, rng) for _ in range(inputs)]
    out = np.empty(n, dtype=np.uint16)
    w = [1.0 / inputs] * inputs
    call = lambda: ext.weighted_sum(out, BF16, xs, [BF16] * inputs, w, n, 1, False)  # noqa: E731
    call()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(16):
            call()
        calls += 16
    dt = time.perf_counter() - t0
    return calls * n * 2 * inputs / dt / 1e9, dt / calls * 1e6


def per_call(ext, calls: int = 100_000) -> float:
    a, b = np.zeros(8, np.float32), np.ones(8, np.float32)
    for _ in range(1000):
        ext.weighted_sum(a, 0, [b, b], [0, 0], [0.5, 0.5], 8, 1, False)
    t0 = time.perf_counter()
    for _ in range(calls):
        ext.weighted_sum(a, 0, [b, b], [0, 0], [0.5, 0.5], 8, 1, False)
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--kib", default="512,64", help="KiB per input, comma list")
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    from fastsoup import _C

    print(f"fastsoup._C from {_C.__file__}; variant {_C.weighted_sum_simd()}")
    for kib in (int(k) for k in args.kib.split(",")):
        gbs, us = throughput(_C, args.inputs, kib, args.seconds)
        print(f"  {args.inputs} bf16 inputs × {kib} KiB: {gbs:.1f} GB/s of input, {us:.0f} µs per call")
    print(f"  one call of 8 fp32 elements, 2 inputs: {per_call(_C):.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
