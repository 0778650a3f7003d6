"""Ambient-diffusion ops, forward + backward: fastsoup vs the unfused PyTorch transcription.

Cases (each against the same formula written as plain PyTorch, in eager mode and under
``torch.compile``; both baselines get the same inputs as the fused op):

* ``vp``: ``fs.ambient_loss_vp`` (x0-mode), baseline ``r = z − k ε̂``, ``mean(c r²)``,
  masked mean. Moves ε̂, z twice and writes ∂ε̂ once.
* ``ve``: ``fs.ambient_loss_ve``, baseline ``λ·mean((D − y)²)`` with the pseudo-target
  ``y`` formed in PyTorch. Moves D, x_t, x_n twice, writes ∂D once.
* ``consistency``: ``fs.consistency_loss`` with a stop-gradient anchor. Moves h_t, h1, h2
  twice, writes ∂h1, ∂h2.
* ``consistency_eps``: ``fs.consistency_loss_eps`` (h formed in the kernel), gradient to
  the two ε̂_s. Moves six tensors twice, writes two.
* ``reverse_step``: ``fs.vp_reverse_step`` producing the two consistency samples in one
  pass (forward only, as used under ``no_grad``). Reads ĥ, ε̂, ξ1, ξ2, writes two.

Effective GB/s counts the bytes listed above (the minimum traffic of the fused op) divided
by the median time; ``peak_extra_mem_MiB`` shows the temporaries (CUDA only).

    pytest benchmarks/bench_ambient.py --benchmark-only                  # measure (GPU)
    FASTSOUP_BENCH_SIZE=smoke pytest benchmarks/bench_ambient.py --benchmark-disable
"""
import pytest
import torch

import fastsoup as fs
from fastsoup import _backend
import fastsoup.ops  # noqa: F401  (registers every op's backend policy before _backend.choose)
from harness import DEVICE, SIZE, measure

SHAPES = {
    "full": {"sd-32x4x128x128": (32, 4, 128, 128), "pixel-64x3x256x256": (64, 3, 256, 256)},
    "small": {"sd-8x4x64x64": (8, 4, 64, 64)},
    "smoke": {"tiny-4x4x8x8": (4, 4, 8, 8)},
}[SIZE]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CASES = ["vp", "ve", "consistency", "consistency_eps", "reverse_step"]
OP_OF = {"vp": "ambient_loss_vp", "ve": "ambient_loss_ve", "consistency": "consistency_loss",
         "consistency_eps": "consistency_loss", "reverse_step": "vp_reverse_step"}


def _v(s, nd):
    return s.view((-1,) + (1,) * (nd - 1))


def _dims(x):
    return list(range(1, x.dim()))


# ------------------------------------------------------------------ unfused baselines
def torch_vp(eps, z, at, st, an, sn):
    a = at / an
    b = (st**2 - a**2 * sn**2).clamp_min(0).sqrt()
    valid = st >= sn
    c = torch.where(valid & (b > 0), (b / a) ** 2, torch.zeros_like(b))
    k = torch.where(b > 0, b / st, torch.zeros_like(b))
    r = z.float() - _v(k, eps.dim()) * eps.float()
    per = c * r.square().mean(dim=_dims(eps))
    return per.sum() / valid.sum().clamp_min(1)


def torch_ve(d, x_t, x_n, st, sn, sigma_data=0.5):
    valid = st > sn
    den = torch.where(valid, st**2 - sn**2, torch.ones_like(st))
    y = (_v(st**2, d.dim()) * x_n.float() - _v(sn**2, d.dim()) * x_t.float()) / _v(den, d.dim())
    lam = torch.where(valid, (st**2 + sigma_data**2) / (st * sigma_data) ** 2, torch.zeros_like(st))
    per = lam * (d.float() - y).square().mean(dim=_dims(d))
    return per.sum() / valid.sum().clamp_min(1)


def torch_consistency(ht, h1, h2):
    ht = ht.detach().float()
    return ((h1.float() - ht) * (h2.float() - ht)).mean()


def torch_consistency_eps(x_t, e_t, at, st, x1, e1, x2, e2, as_, ss):
    nd = x_t.dim()
    ht = ((x_t.float() - _v(st, nd) * e_t.float()) / _v(at, nd)).detach()
    h1 = (x1.float() - _v(ss, nd) * e1.float()) / _v(as_, nd)
    h2 = (x2.float() - _v(ss, nd) * e2.float()) / _v(as_, nd)
    return ((h1 - ht) * (h2 - ht)).mean()


def torch_reverse_step(h, e, xi1, xi2, a_s, c_o, c_f):
    nd = h.dim()
    base = _v(a_s, nd) * h + _v(c_o, nd) * e
    return base + _v(c_f, nd) * xi1, base + _v(c_f, nd) * xi2


# ------------------------------------------------------------------ fused
def fs_vp(eps, z, at, st, an, sn):
    return fs.ambient_loss_vp(eps, z, at, st, an, sn)


def fs_ve(d, x_t, x_n, st, sn):
    return fs.ambient_loss_ve(d, x_t, x_n, st, sn)


def fs_consistency(ht, h1, h2):
    return fs.consistency_loss(ht, h1, h2)


def fs_consistency_eps(x_t, e_t, at, st, x1, e1, x2, e2, as_, ss):
    return fs.consistency_loss_eps(x_t, e_t, at, st, x1, e1, x2, e2, as_, ss)


def fs_reverse_step(h, e, xi1, xi2, a_s, c_o, c_f):
    return fs.vp_reverse_step(h, e, (xi1, xi2), a_s, c_o, c_f)


FUNCS = {
    "vp": (fs_vp, torch_vp), "ve": (fs_ve, torch_ve),
    "consistency": (fs_consistency, torch_consistency),
    "consistency_eps": (fs_consistency_eps, torch_consistency_eps),
    "reverse_step": (fs_reverse_step, torch_reverse_step),
}


def _inputs(case, size, dt):
    """(args, tensors needing grad, bytes moved by the fused op)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    B = size[0]

    def t(grad=False):
        x = torch.randn(size, device=DEVICE, dtype=dt, generator=g)
        return x.requires_grad_(grad)

    def sc(lo, hi):
        return torch.empty(B, device=DEVICE).uniform_(lo, hi, generator=g)

    nbytes = torch.tensor([], dtype=dt).element_size() * torch.Size(size).numel()
    if case == "vp":
        abar_t = sc(0.05, 0.6)
        an = torch.full((B,), 0.7, device=DEVICE).sqrt()
        args = [t(True), t(), abar_t.sqrt(), (1 - abar_t).sqrt(), an, (1 - an**2).sqrt()]
        return args, [args[0]], 5 * nbytes
    if case == "ve":
        args = [t(True), t(), t(), sc(0.6, 3.0), torch.full((B,), 0.5, device=DEVICE)]
        return args, [args[0]], 7 * nbytes
    if case == "consistency":
        args = [t(), t(True), t(True)]
        return args, args[1:], 8 * nbytes
    if case == "consistency_eps":
        at, as_ = sc(0.3, 0.5), sc(0.6, 0.8)
        args = [t(), t(), at, (1 - at**2).sqrt(), t(), t(True), t(), t(True), as_, (1 - as_**2).sqrt()]
        return args, [args[5], args[7]], 14 * nbytes
    args = [t(), t(), t(), t(), sc(0.5, 0.9), sc(0.1, 0.5), sc(0.1, 0.4)]
    return args, [], 6 * nbytes


_compiled = {}


def _impl(case, impl):
    fused, unfused = FUNCS[case]
    if impl == "fastsoup":
        return fused
    if impl == "eager":
        return unfused
    if case not in _compiled:
        _compiled[case] = torch.compile(unfused)
    return _compiled[case]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["fastsoup", "eager", "compile"])
@pytest.mark.parametrize("case", CASES)
def test_ambient_fwd_bwd(benchmark, case, impl, shape, dtype):
    if impl == "compile" and DEVICE.type == "cpu" and SIZE == "smoke":
        pytest.skip("torch.compile compile time dominates a CPU smoke run")
    benchmark.group = f"{case} {shape} {dtype}"
    size = SHAPES[shape]
    args, leaves, bytes_moved = _inputs(case, size, DTYPES[dtype])
    fn = _impl(case, impl)

    if leaves:
        def step():
            for x in leaves:
                x.grad = None
            fn(*args).backward()
    else:
        def step():
            with torch.no_grad():
                fn(*args)

    chosen = _backend.choose(OP_OF[case], DEVICE).backend if impl == "fastsoup" else impl
    measure(benchmark, step, bytes_moved=bytes_moved, impl=impl, backend=chosen,
            shape=list(size), dtype=dtype, case=case)


def test_fused_matches_unfused_smoke():
    """The benchmark's baselines compute the same values as the fused ops."""
    for case in CASES:
        args, _, _ = _inputs(case, (2, 3, 4, 4), torch.float32)
        fused, unfused = FUNCS[case]
        a, b = fused(*args), unfused(*args)
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5)
