"""Per-sample MSE loss, forward + backward: fastsoup vs the diffusers way.

Baseline, as diffusers' training scripts write it (then weighted and masked like AGC):

    l = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dims) * w
    loss = (l * keep).sum() / keep.sum()

in eager mode and under ``torch.compile``; fastsoup runs the same reduction on
``fs.per_sample_mse``. Effective bandwidth counts what the fused op must move: pred and
target read twice (forward, backward) and the gradient written once. The ``copy`` group
measures the device-to-device copy bandwidth, the ceiling for this memory-bound op.

    pytest benchmarks/bench_per_sample_mse.py --benchmark-only            # measure
    FASTSOUP_BENCH_SIZE=smoke pytest benchmarks --benchmark-disable       # CI smoke
"""
import pytest
import torch
import torch.nn.functional as F

import fastsoup as fs
from fastsoup import _backend
import fastsoup.ops  # noqa: F401  (registers every op's backend policy before _backend.choose)
from harness import DEVICE, SIZE, measure

SHAPES = {
    "full": {"sd-8x4x64x64": (8, 4, 64, 64), "sd-32x4x128x128": (32, 4, 128, 128),
             "pixel-256x3x256x256": (256, 3, 256, 256)},
    "small": {"sd-8x4x64x64": (8, 4, 64, 64), "sd-8x4x128x128": (8, 4, 128, 128)},
    "smoke": {"tiny-4x4x8x8": (4, 4, 8, 8)},
}[SIZE]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def diffusers_loss(pred, target, w, keep):
    l = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))
    l = l * w
    return (l * keep).sum() / keep.sum()


def fastsoup_loss(pred, target, w, keep):
    l = fs.per_sample_mse(pred, target, w)
    return (l * keep).sum() / keep.sum()


_compiled = {}


def _impl(name):
    if name == "eager":
        return diffusers_loss
    if name == "compile":
        if "c" not in _compiled:
            _compiled["c"] = torch.compile(diffusers_loss)
        return _compiled["c"]
    return fastsoup_loss


IMPLS = ["fastsoup", "eager", "compile"]
if DEVICE.type == "cuda":
    IMPLS.insert(1, "fastsoup-cuda")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_per_sample_mse_fwd_bwd(benchmark, impl, shape, dtype):
    if impl == "compile" and DEVICE.type == "cpu" and SIZE == "smoke":
        pytest.skip("torch.compile compile time dominates a CPU smoke run")
    if impl == "fastsoup-cuda":
        ok, why = _backend._available("cuda", "cuda")
        if not ok:
            pytest.skip(why)
    benchmark.group = f"per_sample_mse {shape} {dtype}"
    dt = DTYPES[dtype]
    size = SHAPES[shape]
    torch.manual_seed(0)
    pred = torch.randn(size, device=DEVICE, dtype=dt, requires_grad=True)
    target = torch.randn(size, device=DEVICE, dtype=dt)
    w = torch.rand(size[0], device=DEVICE)
    keep = (torch.rand(size[0], device=DEVICE) > 0.1).float()
    fn = _impl(impl)
    backend = "cuda" if impl == "fastsoup-cuda" else None

    def step():
        pred.grad = None
        if backend:
            with fs.use_backend(backend):
                fn(pred, target, w, keep).backward()
        else:
            fn(pred, target, w, keep).backward()

    elem = pred.element_size()
    bytes_moved = 2 * (pred.numel() * elem + target.numel() * target.element_size()) + pred.numel() * elem
    chosen = _backend.choose("per_sample_mse", DEVICE).backend if impl == "fastsoup" else impl
    if chosen == "reference":
        from fastsoup.kernels.cpu import mse_rows_ok

        if mse_rows_ok(pred, target):
            chosen = "_C"
    measure(benchmark, step, bytes_moved=bytes_moved, impl=impl, backend=chosen,
            shape=list(size), dtype=dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_copy_bandwidth_ceiling(benchmark, shape, dtype):
    """dst.copy_(src) over the same bytes as one tensor: the memory-bandwidth ceiling."""
    benchmark.group = f"per_sample_mse {shape} {dtype}"
    src = torch.randn(SHAPES[shape], device=DEVICE, dtype=DTYPES[dtype])
    dst = torch.empty_like(src)
    measure(benchmark, lambda: dst.copy_(src), bytes_moved=2 * src.numel() * src.element_size(),
            impl="copy", shape=list(src.shape), dtype=dtype)
