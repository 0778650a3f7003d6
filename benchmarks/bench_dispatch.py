"""Dispatch cost of fastsoup's fused ops at training-step sizes: eager twin vs custom op.

Every differentiable fused op is built by :class:`fastsoup.ops._registration.FusedOp` twice
over one forward and one backward implementation: a ``torch.library`` custom op (what
``torch.compile`` traces; ``FusedOp.op``) and a plain ``autograd.Function`` twin (what
eager calls run). This suite measures what the twin saves, forward + backward, on small
shapes where per-call overhead dominates:

* ``eager-twin``: the public function as shipped (``FusedOp.__call__`` → the twin);
* ``custom-op``: the same public function with the op's ``FusedOp`` swapped for a shim that
  calls the registered custom op directly (``fastsoup.ops.mse._OP.op``,
  ``fastsoup.ops.rows.BILINEAR.op``): the dispatcher path, with its registered autograd;
* ``torch``: plain PyTorch, ``((p - t)**2).mean(dims)`` or the VP loss transcribed
  (``bench_ambient.torch_vp``): the floor of per-call overhead (role ``baseline``).

Ops: ``fs.per_sample_mse`` (``_OP``) and ``fs.ambient_loss_vp`` (its ``row_bilinear`` through
``BILINEAR``). Torch runs at one thread. Run as a script for the committed table: the
three paths interleaved round by round, per-call µs and the paired difference
``eager-twin − custom-op`` (median and p20–p80 over rounds)::

    pytest benchmarks/bench_dispatch.py --benchmark-only        # pytest-benchmark rows
    python benchmarks/bench_dispatch.py --out benchmarks/results/cpu-dispatch-DATE.md
    FASTSOUP_BENCH_SIZE=smoke pytest benchmarks/bench_dispatch.py --benchmark-disable
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time

import pytest
import torch

import fastsoup as fs
import fastsoup.ops.mse as mse_mod
import fastsoup.ops.rows as rows_mod
from harness import DEVICE, SIZE, measure, sync

SHAPES = {
    "full": {"4x4x8x8": (4, 4, 8, 8), "16x4x64x64": (16, 4, 64, 64)},
    "small": {"4x4x8x8": (4, 4, 8, 8), "16x4x64x64": (16, 4, 64, 64)},
    "smoke": {"4x4x8x8": (4, 4, 8, 8)},
}[SIZE]
OPS = ["per_sample_mse", "ambient_loss_vp"]
IMPLS = ["eager-twin", "custom-op", "torch"]


class _CustomOpLeaf:
    """Stands in for a ``FusedOp``: calls its registered custom op directly."""

    def __init__(self, fused):
        self.fused = fused

    def __call__(self, *args):
        return self.fused.op(*args)


@contextlib.contextmanager
def custom_op_path():
    """The public functions dispatch through the registered custom ops (as under compile)."""
    saved = mse_mod._OP, rows_mod.BILINEAR
    mse_mod._OP, rows_mod.BILINEAR = _CustomOpLeaf(saved[0]), _CustomOpLeaf(saved[1])
    try:
        yield
    finally:
        mse_mod._OP, rows_mod.BILINEAR = saved


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def torch_vp(eps, z, at, st, an, sn):
    from bench_ambient import torch_vp as transcribed

    return transcribed(eps, z, at, st, an, sn)


def make_case(op: str, size):
    """(fastsoup step, plain PyTorch step, leaves) for forward + backward of ``op``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B = size[0]
    pred = torch.randn(size, generator=g).to(DEVICE).requires_grad_(True)
    other = torch.randn(size, generator=g).to(DEVICE)
    dims = list(range(1, len(size)))
    if op == "per_sample_mse":
        def fused():
            pred.grad = None
            fs.per_sample_mse(pred, other).sum().backward()

        def plain():
            pred.grad = None
            ((pred - other) ** 2).mean(dims).sum().backward()
    else:
        abar_t = torch.rand(B, generator=g).mul_(0.55).add_(0.05).to(DEVICE)
        at, st = abar_t.sqrt(), (1 - abar_t).sqrt()
        an = torch.full((B,), 0.7, device=DEVICE).sqrt()
        sn = (1 - an**2).sqrt()

        def fused():
            pred.grad = None
            fs.ambient_loss_vp(pred, other, at, st, an, sn).backward()

        def plain():
            pred.grad = None
            torch_vp(pred, other, at, st, an, sn).backward()
    return fused, plain, pred


def step_for(impl: str, fused, plain):
    if impl == "eager-twin":
        return fused
    if impl == "torch":
        return plain

    def via_custom_op():
        with custom_op_path():
            fused()
    return via_custom_op


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_dispatch_fwd_bwd(benchmark, op, impl, shape):
    benchmark.group = f"dispatch {op} {shape} fp32"
    fused, plain, _ = make_case(op, SHAPES[shape])
    rounds = {"full": 500, "small": 300 if SHAPES[shape][0] <= 4 else 100, "smoke": 1}[SIZE]
    measure(benchmark, step_for(impl, fused, plain), rounds=rounds, warmup=10, impl=impl,
            role="baseline" if impl == "torch" else "", op=op, shape=list(SHAPES[shape]),
            dtype="fp32", threads=torch.get_num_threads())


@pytest.mark.parametrize("op", OPS)
def test_paths_agree(op):
    """The custom-op path computes what the eager twin does (value and gradient), and the
    swap is undone afterwards."""
    size = (3, 2, 4, 4)
    fused, _, pred = make_case(op, size)
    fused()
    g_twin = pred.grad.clone()
    with custom_op_path():
        fused()
    torch.testing.assert_close(pred.grad, g_twin, rtol=1e-6, atol=1e-7)
    assert isinstance(mse_mod._OP, type(rows_mod.BILINEAR))
    assert not isinstance(mse_mod._OP, _CustomOpLeaf)


# ------------------------------------------------------------------ interleaved table
def _batch_time(step, inner: int) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        step()
    sync()
    return (time.perf_counter() - t0) / inner


def _q(data, q):
    data = sorted(data)
    pos = q * (len(data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def interleaved(op: str, size, rounds: int, inner: int) -> dict:
    """Per-call seconds of each path, rounds interleaved (the order rotates every round),
    and the paired differences eager-twin − custom-op."""
    fused, plain, _ = make_case(op, size)
    steps = {impl: step_for(impl, fused, plain) for impl in IMPLS}
    for step in steps.values():
        for _ in range(10):
            step()
    times = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        order = IMPLS[r % 3:] + IMPLS[:r % 3]
        for impl in order:
            times[impl].append(_batch_time(steps[impl], inner))
    diff = [a - b for a, b in zip(times["eager-twin"], times["custom-op"])]
    return {"times": times, "diff": diff}


def _git_head() -> str:
    import subprocess

    try:
        return "git " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "git -"


def main(argv=None) -> int:
    import argparse
    import datetime as _dt
    import platform
    import sys

    ap = argparse.ArgumentParser(description="dispatch cost table (interleaved rounds)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--inner", type=int, default=20, help="calls per timed batch")
    ap.add_argument("--out", default=None, help="markdown file (default: stdout only)")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    lines = []
    with one_thread():
        for op in OPS:
            for name, size in SHAPES.items():
                res = interleaved(op, size, args.rounds, args.inner)
                t = {k: statistics.median(v) * 1e6 for k, v in res["times"].items()}
                d = [x * 1e6 for x in res["diff"]]
                lines.append(
                    f"| {op} | {name} | {t['eager-twin']:.1f} | {t['custom-op']:.1f} | "
                    f"{t['torch']:.1f} | {statistics.median(d):+.1f} ({_q(d, 0.2):+.1f} to "
                    f"{_q(d, 0.8):+.1f}) | {t['custom-op'] / t['eager-twin']:.2f}× |")
                print(lines[-1], flush=True)
    load_after = os.getloadavg()
    versions = {m: __import__(m).__version__ for m in ("torch", "fastsoup")}
    versions["python"] = platform.python_version()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    text = "\n".join([
        f"# fastsoup dispatch cost: {device}", "",
        f"- date: {date}",
        "- command: `python benchmarks/bench_dispatch.py " + " ".join(
            argv if argv is not None else sys.argv[1:]) + "`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
        f"{platform.release()}; torch threads: 1",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- source: {_git_head()} (HEAD when the run started; a shared working tree)",
        f"- load average (1/5/15 min) before: {tuple(round(x, 2) for x in load_before)}, "
        f"after: {tuple(round(x, 2) for x in load_after)} (a shared machine: timings are noisy)",
        f"- {args.rounds} rounds; each round times {args.inner} consecutive calls of each path "
        "(order rotating); per-call µs = batch time / calls; medians over rounds",
        "", "Forward + backward per call, fp32, µs. *eager-twin*: the public function as shipped "
        "(autograd.Function twin). *custom-op*: the same function dispatching through the "
        "registered `torch.library` custom op (what torch.compile traces). *torch*: plain "
        "PyTorch. *twin − op*: median of the paired per-round differences (p20 to p80); "
        "negative means the twin is faster.", "",
        "| op | shape | eager-twin µs | custom-op µs | torch µs | twin − op µs | op / twin |",
        "|---|---|---:|---:|---:|---:|---:|", *lines, ""])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
