"""The ambient / consistency / reverse-step Triton kernels against the PyTorch reference.

Without a GPU these run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on small fp32/fp16 shapes; on a GPU they run compiled.
"""
import math

import pytest
import torch

import fastsoup as fs
from fastsoup.kernels import abi
from fastsoup.kernels.layout import row_layout
from fastsoup.ops import ambient_coefficients as coefs
from fastsoup.ops import rows

triton = pytest.importorskip("triton")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _run(backend, fn, tensors, grad_seed=0):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with fs.use_backend(backend):
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(grad_seed)
        ups = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
        torch.autograd.backward(outs, ups)
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _compare(fn, tensors, tol, grad_tol=None):
    outs_t, grads_t = _run("triton", fn, tensors)
    outs_r, grads_r = _run("reference", fn, tensors)
    grad_tol = tol if grad_tol is None else grad_tol
    for a, b in zip(outs_t, outs_r):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    for t, a, b in zip(tensors, grads_t, grads_r):
        assert a.dtype == t.dtype and a.shape == t.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=grad_tol, atol=grad_tol)


def _vp_scalars(B, device):
    abar_t = torch.linspace(0.65, 0.05, B)
    abar_n = torch.full((B,), 0.7)
    abar_t[0] = 0.7       # b = 0
    if B > 2:
        abar_t[2] = 0.9   # σ_t < σ_n: masked
    return [s.to(device) for s in (abar_t.sqrt(), (1 - abar_t).sqrt(), abar_n.sqrt(), (1 - abar_n).sqrt())]


SHAPES = [(4, 3, 8, 8), (3, 1000), (2, 5, 7, 11)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["x0", "eps"])
def test_vp_loss(triton_device, dtype, shape, mode):
    torch.manual_seed(0)
    eps = torch.randn(shape, device=triton_device).to(dtype)
    z = torch.randn(shape, device=triton_device).to(dtype)
    sc = _vp_scalars(shape[0], triton_device)
    w = torch.linspace(0.5, 1.5, shape[0], device=triton_device)
    _compare(lambda e, zz: fs.ambient_loss_vp(e, zz, *sc, mode=mode, weight=w, reduction="none"),
             [eps, z], TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_ve_loss(triton_device, dtype, shape):
    torch.manual_seed(1)
    B = shape[0]
    x0 = torch.randn(shape, device=triton_device).to(dtype)
    x_t = torch.randn(shape, device=triton_device).to(dtype)
    x_n = torch.randn(shape, device=triton_device).to(dtype)
    st = torch.linspace(0.3, 2.0, B, device=triton_device)
    sn = torch.full((B,), 0.5, device=triton_device)
    _compare(lambda a, b, c: fs.ambient_loss_ve(a, b, c, st, sn, reduction="none"),
             [x0, x_t, x_n], TOL[dtype], grad_tol=5 * TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("stop", [True, False])
def test_consistency(triton_device, dtype, stop):
    torch.manual_seed(2)
    hs = [torch.randn(4, 3, 8, 8, device=triton_device).to(dtype) for _ in range(3)]
    if stop:  # the anchor gets no gradient: differentiate h1, h2 only
        anchor = hs[0]
        _compare(lambda b, c: fs.consistency_loss(anchor, b, c, reduction="none"), hs[1:], TOL[dtype])
    else:
        _compare(lambda a, b, c: fs.consistency_loss(a, b, c, stop_anchor_grad=False,
                                                     reduction="none"), hs, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_consistency_eps_six_inputs(triton_device, dtype):
    torch.manual_seed(3)
    xs = [torch.randn(3, 2, 9, 7, device=triton_device).to(dtype) for _ in range(6)]
    at, st, as_, ss = (torch.tensor(v, device=triton_device) for v in
                       ([0.5, 0.6, 0.7], [0.866, 0.8, 0.714], [0.7, 0.8, 0.9], [0.714, 0.6, 0.436]))
    _compare(lambda *a: fs.consistency_loss_eps(a[0], a[1], at, st, a[2], a[3], a[4], a[5], as_, ss,
                                                stop_anchor_grad=False, reduction="none"),
             xs, TOL[dtype], grad_tol=5 * TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reverse_step(triton_device, dtype):
    torch.manual_seed(4)
    xs = [torch.randn(4, 3, 8, 8, device=triton_device).to(dtype) for _ in range(4)]
    sc = [torch.rand(4, device=triton_device) for _ in range(5)]
    _compare(lambda h, e, a, b: fs.vp_reverse_step(h, e, (a, b), *sc[:3]), xs, TOL[dtype])
    _compare(lambda h, e, a: fs.vp_reverse_step(h, e, a, *sc[:3]), xs[:3], TOL[dtype])
    _compare(lambda x, e, a: fs.vp_reverse_step_from_eps(x, e, a, sc[0] + 0.5, *sc[1:]), xs[:3],
             TOL[dtype], grad_tol=5 * TOL[dtype])


def test_mixed_dtypes(triton_device):
    torch.manual_seed(5)
    eps = torch.randn(3, 4, 6, 6, device=triton_device).half()
    z = torch.randn(3, 4, 6, 6, device=triton_device)
    sc = _vp_scalars(3, triton_device)
    _compare(lambda e, zz: fs.ambient_loss_vp(e, zz, *sc, reduction="none"), [eps, z], 2e-3)
    xs = [eps, z, z.half(), eps.float()]
    _compare(lambda h, e, a, b: fs.vp_reverse_step(h, e, [a, b], 0.5, 0.3, 0.2), xs, 2e-3)


def test_channels_last_slices_and_fallback(triton_device):
    torch.manual_seed(6)
    cl = [torch.randn(2, 4, 6, 5, device=triton_device).to(memory_format=torch.channels_last)
          for _ in range(3)]
    assert row_layout(cl).dense
    _compare(lambda a, b, c: fs.consistency_loss(a, b, c, stop_anchor_grad=False, reduction="none"),
             cl, 1e-5)
    base = torch.randn(3, 8, 7, 9, device=triton_device)
    sliced = base[:, 1::2, :, 2:]
    other = torch.randn(3, 7, 4, 9, device=triton_device).permute(0, 2, 1, 3)[..., 2:]
    assert not row_layout([sliced, other]).dense
    st, sn = torch.tensor([1.0, 2.0, 0.7], device=triton_device), torch.full((3,), 0.5, device=triton_device)
    _compare(lambda a, b, c: fs.ambient_loss_ve(a, b, c, st, sn, reduction="none"),
             [sliced, other, sliced.contiguous()], 1e-5)
    odd = torch.randn(2, 3, 4, 5, 6, 2, device=triton_device).permute(0, 5, 3, 1, 4, 2)
    odd2 = torch.randn(2, 2, 5, 3, 6, 4, device=triton_device)
    assert row_layout([odd, odd2]) is None  # falls back to contiguous copies, still correct
    sc = _vp_scalars(2, triton_device)
    _compare(lambda e, zz: fs.ambient_loss_vp(e, zz, *sc, reduction="none"), [odd, odd2], 1e-5)
    _compare(lambda h, e, a: fs.vp_reverse_step(h, e, a, 0.5, 0.3, 0.2), [odd, odd2, odd], 1e-5)


def test_long_rows_split_across_programs(triton_device):
    from fastsoup.kernels.triton import ambient as tamb

    torch.manual_seed(7)
    xs = [torch.randn(1, 3 * 4096 + 17, device=triton_device) for _ in range(3)]
    coef = torch.randn(1, abi.COEF_COLS, device=triton_device)
    layout = row_layout(xs)
    out = tamb.bilinear_forward(xs, coef, False, layout, chunk=tamb.BLOCK)
    torch.testing.assert_close(out, rows.reference_bilinear(xs, coef, False), rtol=1e-5, atol=1e-5)
    _compare(lambda a, b, c: fs.consistency_loss(a, b, c, stop_anchor_grad=False, reduction="none"),
             xs, 1e-5)


@pytest.mark.parametrize("kind", ["vp_x0", "vp_eps", "ve", "consistency_eps", "step", "step_eps"])
def test_coefficient_kernel_matches_reference(triton_device, kind):
    from fastsoup.kernels.triton import ambient as tamb

    B = 300  # more than one block of the coefficient kernel
    g = torch.Generator().manual_seed(10)
    abar_t = torch.rand(B, generator=g) * 0.9 + 0.05
    abar_n = torch.rand(B, generator=g) * 0.9 + 0.05
    abar_t[:5] = abar_n[:5]                      # b = 0 rows (t = t_n)
    at, st = abar_t.sqrt(), (1 - abar_t).sqrt()
    an, sn = abar_n.sqrt(), (1 - abar_n).sqrt()
    scalars = {"vp_x0": [at, st, an, sn], "vp_eps": [at, st, an, sn.double()],
               "ve": [st * 3, sn * 3], "consistency_eps": [at, st, an, sn],
               "step": [at, st, an], "step_eps": [at, st, an, sn, st * 0.5]}[kind]
    scalars = [x.to(triton_device) for x in scalars]
    for n_out in ((1, 2) if kind.startswith("step") else (1,)):
        got = tamb.coefficients(coefs.KINDS.index(kind), scalars, B, 0.7, n_out)
        want = coefs.reference_coefficients(kind, scalars, 0.7, n_out, torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert torch.isfinite(got).all()


def test_masked_rows_with_nan_give_exact_zero_gradients(triton_device):
    eps = torch.randn(3, 50, device=triton_device)
    eps[1, 7] = float("nan")
    eps.requires_grad_()
    z = torch.randn(3, 50, device=triton_device)
    sc = [torch.tensor(v, device=triton_device) for v in
          ([0.6, 0.95, 0.5], [0.8, math.sqrt(1 - 0.95**2), math.sqrt(0.75)],
           [0.9] * 3, [math.sqrt(0.19)] * 3)]
    with fs.use_backend("triton"):
        per = fs.ambient_loss_vp(eps, z, *sc, reduction="none")
        loss = fs.ambient_loss_vp(eps, z, *sc)
        loss.backward()
    assert per[1].item() == 0.0 and torch.isfinite(loss)
    assert (eps.grad[1] == 0).all() and torch.isfinite(eps.grad).all()


def test_triton_kernels_actually_run(triton_device, monkeypatch):
    """Guard against the comparisons above passing because both sides ran the reference."""
    from fastsoup.kernels.triton import ambient as tamb

    calls = []
    for name in ("bilinear_forward", "bilinear_backward", "linear_forward", "coefficients"):
        real = getattr(tamb, name)
        monkeypatch.setattr(tamb, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    x = torch.randn(2, 8, device=triton_device, requires_grad=True)
    with fs.use_backend("triton"):
        fs.consistency_loss(x, x * 2, x * 3, stop_anchor_grad=False).backward()
        fs.vp_reverse_step(x, x, x, 0.5, 0.5, 0.5).sum().backward()
    assert calls.count("bilinear_forward") == 1 and calls.count("bilinear_backward") == 1
    assert calls.count("linear_forward") == 2  # forward and backward
    assert calls.count("coefficients") == 1    # the step's table (consistency's is constant)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_dtypes_against_float64(dtype):
    torch.manual_seed(8)
    dev = torch.device("cuda")
    eps = torch.randn(8, 4, 64, 64, device=dev).to(dtype).requires_grad_()
    z = torch.randn(8, 4, 64, 64, device=dev).to(dtype)
    sc = _vp_scalars(8, dev)
    loss = fs.ambient_loss_vp(eps, z, *sc)
    loss.backward()
    e64 = eps.detach().double().requires_grad_()
    ref = fs.ambient_loss_vp(e64, z.double(), *[s.double() for s in sc])
    ref.backward()
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(eps.grad.double(), e64.grad, rtol=tol * 5, atol=tol * 1e-3)


@pytest.mark.cuda
def test_cuda_long_row_and_no_row_sized_temporaries():
    """B = 1, D = 16M: chunked over the device; fwd + bwd allocates ~ only the gradient."""
    dev = torch.device("cuda")
    torch.manual_seed(9)
    n = 16 * 2**20
    eps = torch.randn(1, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
    sc = [torch.tensor([v], device=dev) for v in (0.5, math.sqrt(0.75), 0.9, math.sqrt(0.19))]
    fs.ambient_loss_vp(eps, z, *sc).backward()  # warm-up (compilation)
    eps.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fs.ambient_loss_vp(eps, z, *sc)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = eps.numel() * eps.element_size()
    assert extra <= grad_bytes + 4 * 2**20, (extra, grad_bytes)
    ref = fs.ambient_loss_vp(eps.detach().double(), z.double(), *[s.double() for s in sc])
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)


def test_backward_uses_the_backend_chosen_in_forward(triton_device, monkeypatch):
    """Autograd runs CUDA backwards on its own thread, where a thread-local
    fs.use_backend() is not visible: the forward's choice must travel with the graph."""
    from fastsoup.kernels.triton import ambient as tamb

    calls = []
    real_bw, real_lin = tamb.bilinear_backward, tamb.linear_forward
    monkeypatch.setattr(tamb, "bilinear_backward", lambda *a, **k: calls.append("bilinear") or real_bw(*a, **k))
    monkeypatch.setattr(tamb, "linear_forward", lambda *a, **k: calls.append("linear") or real_lin(*a, **k))
    B = 3
    eps = torch.randn(B, 2, 8, device=triton_device, requires_grad=True)
    z = torch.randn(B, 2, 8, device=triton_device)
    a_t = torch.full((B,), 0.6, device=triton_device)
    a_n = torch.full((B,), 0.9, device=triton_device)
    with fs.use_backend("triton"):
        loss = fs.ambient_loss_vp(eps, z, a_t, (1 - a_t ** 2).sqrt(), a_n, (1 - a_n ** 2).sqrt())
    loss.backward()               # outside the override
    assert calls == ["bilinear"]
    h = torch.randn(B, 2, 8, device=triton_device, requires_grad=True)
    with fs.use_backend("triton"):
        coefs = fs.vp_reverse_step_coefficients(torch.linspace(0.999, 0.1, 10), torch.full((B,), 7),
                                                torch.full((B,), 4))
        x_s = fs.vp_reverse_step(h, torch.randn_like(h), torch.randn_like(h), coefs.alpha_s,
                                 coefs.c_o, coefs.c_f)
    calls.clear()
    x_s.sum().backward()          # the transposed map runs the forward kernel again
    assert calls == ["linear"]
