"""fs.ambient_loss_vp / fs.ambient_loss_ve: against unfused transcriptions of the double
Tweedie formulas (SPEC §3), gradients, masking and b = 0 edge cases, dtypes, errors,
registration (opcheck, torch.compile)."""
import math

import pytest
import torch

import fastsoup as fs
from fastsoup.kernels import abi
from fastsoup.ops import ambient as amb
from fastsoup.ops import ambient_coefficients as coefs
from fastsoup.ops import rows
from fastsoup.ops.reverse_step import OP_STEP


# --------------------------------------------------------------------- transcriptions
def vp_transcription(eps_pred, x_t, x_n, alpha_t, sigma_t, alpha_n, sigma_n, mode):
    """The double Tweedie written out: x̂_0, then x̂_n = E[x_n | x_t], then the loss.

    x_t = α_t x_0 + σ_t ε with σ_t ε = a σ_n η + b z, so
    E[x_n | x_t] = α_n E[x_0 | x_t] + σ_n E[η | x_t] = α_n x̂_0 + σ_n (a σ_n / σ_t) ε̂.
    x0-mode compares x̂_n with x_n; ε-mode compares ẑ = (x_t − a x̂_n)/b with z, where z is
    recovered from the data as (x_t − a x_n)/b. Per-sample values, float64.
    """
    nd = eps_pred.dim()
    v = lambda s: s.double().view((-1,) + (1,) * (nd - 1))  # noqa: E731
    at, st, an, sn = v(alpha_t), v(sigma_t), v(alpha_n), v(sigma_n)
    a = at / an
    b = torch.sqrt(st**2 - a**2 * sn**2)
    x0_hat = (x_t.double() - st * eps_pred.double()) / at
    xn_hat = an * x0_hat + (a * sn**2 / st) * eps_pred.double()
    if mode == "x0":
        err = xn_hat - x_n.double()
    else:
        z_hat = (x_t.double() - a * xn_hat) / b
        z = (x_t.double() - a * x_n.double()) / b
        err = z_hat - z
    return err.square().reshape(err.shape[0], -1).mean(1)


def ve_transcription(x0_pred, x_t, x_n, sigma_t, sigma_n, sigma_data=0.5):
    """λ(σ_t) σ_t⁴/(σ_t² − σ_n²)² · mean((x̂_n − x_n)²), x̂_n the double-Tweedie estimate."""
    nd = x0_pred.dim()
    v = lambda s: s.double().view((-1,) + (1,) * (nd - 1))  # noqa: E731
    st, sn = v(sigma_t), v(sigma_n)
    xn_hat = (sn**2 / st**2) * x_t.double() + (1 - sn**2 / st**2) * x0_pred.double()
    lam = (st**2 + sigma_data**2) / (st * sigma_data) ** 2
    w = lam * st**4 / (st**2 - sn**2) ** 2
    per = (w * (xn_hat - x_n.double()).square()).reshape(x0_pred.shape[0], -1).mean(1)
    return per


def vp_batch(B=5, shape=(3, 4, 4), seed=0, abar_t=None, abar_n=0.7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if abar_t is None:
        abar_t = torch.linspace(0.6, 0.05, B, dtype=torch.float64)
    abar_t = torch.as_tensor(abar_t, dtype=torch.float64)
    abar_n = torch.full((B,), abar_n, dtype=torch.float64)
    alpha_t, sigma_t = abar_t.sqrt(), (1 - abar_t).sqrt()
    alpha_n, sigma_n = abar_n.sqrt(), (1 - abar_n).sqrt()
    x0 = torch.randn((B,) + shape, generator=g, dtype=torch.float64)
    eta = torch.randn((B,) + shape, generator=g, dtype=torch.float64)
    z = torch.randn((B,) + shape, generator=g, dtype=torch.float64)
    x_n = alpha_n.view(-1, 1, 1, 1) * x0 + sigma_n.view(-1, 1, 1, 1) * eta
    a = alpha_t / alpha_n
    b = torch.sqrt(torch.clamp(sigma_t**2 - a**2 * sigma_n**2, min=0))
    x_t = a.view(-1, 1, 1, 1) * x_n + b.view(-1, 1, 1, 1) * z
    eps = torch.randn((B,) + shape, generator=g, dtype=torch.float64)
    sc = [s.float() if dtype != torch.float64 else s for s in (alpha_t, sigma_t, alpha_n, sigma_n)]
    return dict(eps=eps.to(dtype), z=z.to(dtype), x_t=x_t, x_n=x_n, scalars=sc)


# --------------------------------------------------------------------- VP
@pytest.mark.parametrize("mode", ["x0", "eps"])
def test_vp_matches_double_tweedie_transcription(mode):
    d = vp_batch()
    eps = d["eps"].double().requires_grad_()
    ref = vp_transcription(eps, d["x_t"], d["x_n"], *d["scalars"], mode=mode)
    # fastsoup sees only ε̂, z and the scalars (float32 inputs)
    e32 = d["eps"].clone().requires_grad_()
    per = fs.ambient_loss_vp(e32, d["z"], *d["scalars"], mode=mode, reduction="none")
    assert per.dtype == torch.float32 and per.shape == (5,)
    torch.testing.assert_close(per.double(), ref, rtol=2e-5, atol=1e-6)
    loss = fs.ambient_loss_vp(e32, d["z"], *d["scalars"], mode=mode)
    torch.testing.assert_close(loss.double(), ref.mean(), rtol=2e-5, atol=1e-6)
    loss.backward()
    ref.mean().backward()
    torch.testing.assert_close(e32.grad.double(), eps.grad, rtol=1e-4, atol=1e-7)


def test_vp_hand_computed():
    # α_t = 0.6, σ_t = 0.8, α_n = σ_n = sqrt(0.5): a = 0.6 sqrt(2), b² = 0.64 − 0.36 = 0.28
    s = math.sqrt(0.5)
    eps = torch.tensor([[1.0, -1.0]])
    z = torch.tensor([[0.5, 0.0]])
    b = math.sqrt(0.28)
    r = [0.5 - b / 0.8, 0.0 + b / 0.8]
    expected_eps = (r[0] ** 2 + r[1] ** 2) / 2
    a = 0.6 / s
    out = fs.ambient_loss_vp(eps, z, 0.6, 0.8, s, s, mode="eps", reduction="none")
    assert out.item() == pytest.approx(expected_eps, rel=1e-6)
    out = fs.ambient_loss_vp(eps, z, 0.6, 0.8, s, s, mode="x0", reduction="none")
    assert out.item() == pytest.approx((b / a) ** 2 * expected_eps, rel=1e-6)


@pytest.mark.parametrize("mode", ["x0", "eps"])
def test_vp_gradcheck_float64(mode):
    d = vp_batch(B=4, shape=(2, 3), dtype=torch.float64, seed=3)
    eps = d["eps"].requires_grad_()
    z = d["z"].requires_grad_()
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    sc = d["scalars"]
    sc[1] = sc[1].clone()
    sc[1][0] = sc[3][0] * 0.5  # one masked sample (σ_t < σ_n)
    for red in ("mean", "none", "sum"):
        assert torch.autograd.gradcheck(
            lambda e, zz, ww: fs.ambient_loss_vp(e, zz, *sc, mode=mode, weight=ww, reduction=red),
            (eps, z, w))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["x0", "eps"])
def test_vp_b_zero_and_masked_samples(backend, mode, triton_device):
    """t = t_n (b = 0): zero loss and zero gradient; σ_t < σ_n: masked, out of the mean."""
    if backend == "reference":
        triton_device = torch.device("cpu")
    B = 4
    alpha_n, sigma_n = math.sqrt(0.7), math.sqrt(0.3)
    alpha_t = torch.tensor([alpha_n, 0.6, 0.9, 0.5])   # 0: t = t_n; 2: σ_t < σ_n (masked)
    sigma_t = (1 - alpha_t.double() ** 2).sqrt().float()
    alpha_t[0], sigma_t[0] = alpha_n, sigma_n          # exactly equal: b = 0
    eps = torch.randn(B, 3, 8, device=triton_device, requires_grad=True)
    z = torch.randn(B, 3, 8, device=triton_device)
    with torch.no_grad():
        eps[2, 0, 0] = float("nan")                     # masked rows may hold anything
    sc = [t.to(triton_device) for t in (alpha_t, sigma_t, torch.full((B,), alpha_n),
                                        torch.full((B,), sigma_n))]
    with fs.use_backend(backend):
        per = fs.ambient_loss_vp(eps, z, *sc, mode=mode, reduction="none")
        loss = fs.ambient_loss_vp(eps, z, *sc, mode=mode)
        loss.backward()
    assert per[0].item() == 0.0 and per[2].item() == 0.0
    assert per[1] > 0 and per[3] > 0
    assert torch.isfinite(loss)
    # V = 3 valid samples (the b = 0 one counts, the masked one does not)
    torch.testing.assert_close(loss, per.sum() / 3)
    assert (eps.grad[0] == 0).all() and (eps.grad[2] == 0).all()
    assert torch.isfinite(eps.grad).all() and eps.grad[1].abs().sum() > 0


def test_vp_all_masked_is_zero_not_nan():
    eps = torch.randn(3, 10, requires_grad=True)
    z = torch.randn(3, 10)
    loss = fs.ambient_loss_vp(eps, z, 0.9, 0.3, 0.6, 0.8)  # σ_t < σ_n everywhere
    loss.backward()
    assert loss.item() == 0.0 and (eps.grad == 0).all()


def test_vp_weights_and_reductions():
    d = vp_batch(B=4, shape=(6,), seed=5)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5])
    per = fs.ambient_loss_vp(d["eps"], d["z"], *d["scalars"], reduction="none")
    perw = fs.ambient_loss_vp(d["eps"], d["z"], *d["scalars"], weight=w, reduction="none")
    torch.testing.assert_close(perw, per * w)
    torch.testing.assert_close(fs.ambient_loss_vp(d["eps"], d["z"], *d["scalars"], weight=w),
                               (per * w).mean())
    torch.testing.assert_close(fs.ambient_loss_vp(d["eps"], d["z"], *d["scalars"], reduction="sum"),
                               per.sum())


def test_vp_none_composes_with_low_loss_exclusion():
    d = vp_batch(B=6, shape=(5,), seed=6)
    eps = d["eps"].requires_grad_()
    per = fs.ambient_loss_vp(eps, d["z"], *d["scalars"], reduction="none")
    keep = fs.low_loss_keep_mask(per, k=2)
    loss = (per * keep).sum() / keep.sum()
    loss.backward()
    dropped = (~keep).nonzero().flatten()
    assert len(dropped) == 2 and (eps.grad[dropped] == 0).all()
    assert set(dropped.tolist()) == set(torch.sort(per.detach()).indices[:2].tolist())


@pytest.mark.parametrize("pdt,zdt", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.float16)])
def test_vp_mixed_dtypes_reference(pdt, zdt):
    d = vp_batch(B=3, seed=7)
    eps = d["eps"].to(pdt).requires_grad_()
    z = d["z"].to(zdt)
    out = fs.ambient_loss_vp(eps, z, *d["scalars"], reduction="none")
    assert out.dtype == torch.float32
    ref = fs.ambient_loss_vp(eps.detach().double(), z.double(),
                             *[s.double() for s in d["scalars"]], reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert eps.grad.dtype == pdt


def test_vp_noncontiguous_and_ranks():
    d = vp_batch(B=3, shape=(4, 6, 5), seed=8)
    eps = d["eps"].permute(0, 3, 1, 2)            # non-contiguous
    z = d["z"].permute(0, 3, 1, 2).contiguous()
    out = fs.ambient_loss_vp(eps, z, *d["scalars"], reduction="none")
    ref = fs.ambient_loss_vp(eps.contiguous(), z, *d["scalars"], reduction="none")
    torch.testing.assert_close(out, ref)
    flat = fs.ambient_loss_vp(d["eps"].reshape(3, -1), d["z"].reshape(3, -1), *d["scalars"],
                              reduction="none")
    torch.testing.assert_close(flat, fs.ambient_loss_vp(d["eps"], d["z"], *d["scalars"],
                                                        reduction="none"))


# --------------------------------------------------------------------- VE
def ve_batch(B=5, shape=(3, 4, 4), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sigma_n = torch.full((B,), 0.4)
    sigma_t = torch.linspace(0.5, 3.0, B)
    x0 = torch.randn((B,) + shape, generator=g)
    x_n = x0 + 0.4 * torch.randn((B,) + shape, generator=g)
    z = torch.randn((B,) + shape, generator=g)
    x_t = x_n + (sigma_t**2 - sigma_n**2).sqrt().view((-1,) + (1,) * len(shape)) * z
    pred = torch.randn((B,) + shape, generator=g)
    return [t.to(dtype) for t in (pred, x_t, x_n)] + [sigma_t.to(dtype), sigma_n.to(dtype)]


def test_ve_matches_double_tweedie_transcription():
    pred, x_t, x_n, st, sn = ve_batch()
    p64 = pred.double().requires_grad_()
    xt64 = x_t.double().requires_grad_()
    xn64 = x_n.double().requires_grad_()
    ref = ve_transcription(p64, xt64, xn64, st, sn)
    pred.requires_grad_()
    x_t.requires_grad_()
    x_n.requires_grad_()
    per = fs.ambient_loss_ve(pred, x_t, x_n, st, sn, reduction="none")
    torch.testing.assert_close(per.double(), ref, rtol=2e-5, atol=1e-6)
    loss = fs.ambient_loss_ve(pred, x_t, x_n, st, sn)
    torch.testing.assert_close(loss.double(), ref.mean(), rtol=2e-5, atol=1e-6)
    loss.backward()
    ref.mean().backward()
    for got, want in ((pred, p64), (x_t, xt64), (x_n, xn64)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-6)


def test_ve_pseudo_target_form_and_sigma_data():
    pred, x_t, x_n, st, sn = ve_batch(B=3, shape=(7,), seed=2)
    y = (st[:, None] ** 2 * x_n - sn[:, None] ** 2 * x_t) / (st[:, None] ** 2 - sn[:, None] ** 2)
    for sd in (0.5, 1.0):
        lam = (st**2 + sd**2) / (st * sd) ** 2
        want = lam * (pred - y).square().mean(1)
        got = fs.ambient_loss_ve(pred, x_t, x_n, st, sn, sigma_data=sd, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ve_gradcheck_float64():
    pred, x_t, x_n, st, sn = ve_batch(B=4, shape=(2, 3), seed=4, dtype=torch.float64)
    st = st.clone()
    st[1] = sn[1]  # masked (σ_t == σ_n)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    args = [t.requires_grad_() for t in (pred, x_t, x_n)] + [w]
    for red in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda p, a, b, ww: fs.ambient_loss_ve(p, a, b, st, sn, weight=ww, reduction=red), args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ve_masks_sigma_t_at_or_below_sigma_n(backend, triton_device):
    if backend == "reference":
        triton_device = torch.device("cpu")
    pred = torch.randn(4, 2, 9, device=triton_device, requires_grad=True)
    x_t = torch.randn(4, 2, 9, device=triton_device)
    x_n = torch.randn(4, 2, 9, device=triton_device)
    st = torch.tensor([0.5, 0.8, 0.3, 1.0], device=triton_device)
    sn = torch.full((4,), 0.5, device=triton_device)       # 0: equal, 2: below -> masked
    with fs.use_backend(backend):
        per = fs.ambient_loss_ve(pred, x_t, x_n, st, sn, reduction="none")
        loss = fs.ambient_loss_ve(pred, x_t, x_n, st, sn)
        loss.backward()
    assert per[0].item() == 0.0 and per[2].item() == 0.0 and (per[[1, 3]] > 0).all()
    torch.testing.assert_close(loss, per.sum() / 2)
    assert torch.isfinite(pred.grad).all()
    assert (pred.grad[[0, 2]] == 0).all() and (pred.grad[[1, 3]] != 0).any()


# --------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    e = torch.randn(2, 3)
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="extra_noise"):
        fs.ambient_loss_vp(e, torch.randn(2, 4), 0.5, 0.8, 0.9, 0.4)
    with pytest.raises(TypeError, match="eps_pred"):
        fs.ambient_loss_vp(e.long(), z, 0.5, 0.8, 0.9, 0.4)
    with pytest.raises(ValueError, match="mode"):
        fs.ambient_loss_vp(e, z, 0.5, 0.8, 0.9, 0.4, mode="v")
    with pytest.raises(ValueError, match="reduction"):
        fs.ambient_loss_vp(e, z, 0.5, 0.8, 0.9, 0.4, reduction="avg")
    with pytest.raises(ValueError, match=r"sigma_t must have shape \[B\]"):
        fs.ambient_loss_vp(e, z, 0.5, torch.ones(3), 0.9, 0.4)
    with pytest.raises(TypeError, match="alpha_n"):
        fs.ambient_loss_vp(e, z, 0.5, 0.8, torch.ones(2, dtype=torch.long), 0.4)
    with pytest.raises(ValueError, match="alpha_t requires grad"):
        fs.ambient_loss_vp(e, z, torch.ones(2, requires_grad=True), 0.8, 0.9, 0.4)
    with pytest.raises(ValueError, match="weight"):
        fs.ambient_loss_vp(e, z, 0.5, 0.8, 0.9, 0.4, weight=torch.ones(5))
    with pytest.raises(ValueError, match="x_n"):
        fs.ambient_loss_ve(e, z, torch.randn(3, 3), 1.0, 0.5)
    with pytest.raises(TypeError, match="x_t"):
        fs.ambient_loss_ve(e, z.int(), z, 1.0, 0.5)
    with pytest.raises(ValueError, match="sigma_data"):
        fs.ambient_loss_ve(e, z, z, 1.0, 0.5, sigma_data=0.0)
    with pytest.raises(ValueError, match="no elements"):
        fs.ambient_loss_ve(torch.randn(2, 0), torch.randn(2, 0), torch.randn(2, 0), 1.0, 0.5)


# --------------------------------------------------------------------- registration
def test_opcheck_custom_ops():
    torch.manual_seed(0)
    xs = [torch.randn(3, 4, 5, requires_grad=True) for _ in range(3)]
    coef = torch.randn(3, abi.COEF_COLS)
    for square in (True, False):
        torch.library.opcheck(rows.BILINEAR.op, (amb.OP_VE, xs, coef, square))
    plain = [x.detach() for x in xs]  # the backward op itself is not differentiable
    torch.library.opcheck(rows.BILINEAR.backward_op,
                          (amb.OP_VE, torch.randn(3), plain, coef, False, [True, False, True]))
    torch.library.opcheck(rows.LINEAR.op, (OP_STEP, xs, coef, 2, torch.float32, ""))
    scalars = [torch.rand(3) + 0.5 for _ in range(4)]
    torch.library.opcheck(coefs._coefficients_op,
                          (amb.OP_VP, "vp_x0", scalars, 0.0, 1, torch.float32))


def test_coefficient_table_layout():
    """The [B, 16] table: A, B, scale and validity columns as documented."""
    at = torch.tensor([0.6, 0.9, math.sqrt(0.7)], dtype=torch.float64)
    st = (1 - at**2).sqrt()
    an = torch.full((3,), math.sqrt(0.7), dtype=torch.float64)
    sn = (1 - an**2).sqrt()
    T = coefs.reference_coefficients("vp_x0", [at, st, an, sn], 0.0, 1, torch.float64)
    a = at / an
    b = (st**2 - a**2 * sn**2).clamp_min(0).sqrt()
    assert T[0, 0].item() == pytest.approx(-(b[0] / st[0]).item())
    assert T[0, abi.COL_SCALE].item() == pytest.approx(((b[0] / a[0]) ** 2).item())
    assert T[:, abi.COL_VALID].tolist() == [1.0, 0.0, 1.0]   # σ_t < σ_n in row 1
    assert T[1].abs().sum().item() == 0.0                   # masked: all zero
    assert T[2, abi.COL_SCALE].item() == 0.0 and T[2, abi.COL_VALID].item() == 1.0  # b = 0


def test_torch_compile_fullgraph():
    d = vp_batch(B=3, shape=(4, 4), seed=9)
    sc = d["scalars"]

    def f(e, z):
        return fs.ambient_loss_vp(e, z, *sc)

    eps = d["eps"].clone().requires_grad_()
    eager = f(eps, d["z"])
    eager.backward()
    g_eager = eps.grad.clone()
    eps.grad = None
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(eps, d["z"])
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(eps.grad, g_eager)


def test_documented_vp_training_step_runs():
    """The VP training step of the fastsoup.ops.ambient docstring, with a toy network."""
    from types import SimpleNamespace

    torch.manual_seed(11)
    T, t_n, B, dev = 1000, 500, 6, torch.device("cpu")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T) ** 2
    scheduler = SimpleNamespace(alphas_cumprod=torch.cumprod(1 - betas, 0))
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    x_n = torch.randn(B, 4, 8, 8)

    t = torch.randint(t_n, T, (B,), device=dev)
    t[0] = t_n                                                   # b = 0 sample
    alpha_t, sigma_t = fs.vp_alpha_sigma(scheduler, t)
    alpha_n, sigma_n = fs.vp_alpha_sigma(scheduler, torch.full_like(t, t_n))
    a = alpha_t / alpha_n
    b = (sigma_t**2 - a**2 * sigma_n**2).clamp_min(0).sqrt()
    z = torch.randn_like(x_n)
    x_t = a.view(-1, 1, 1, 1) * x_n + b.view(-1, 1, 1, 1) * z
    eps_pred = net(x_t)
    loss = fs.ambient_loss_vp(eps_pred, z, alpha_t, sigma_t, alpha_n, sigma_n, mode="x0")
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert b[0].item() == 0.0
    per = fs.ambient_loss_vp(eps_pred, z, alpha_t, sigma_t, alpha_n, sigma_n, reduction="none")
    assert per[0].item() == 0.0 and (per[1:] > 0).all()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()
