"""fs.consistency_loss (h and ε forms), the fused VP reverse step and its coefficients."""
from types import SimpleNamespace

import pytest
import torch

import fastsoup as fs


def _h(shape=(4, 3, 5), seed=0, dtype=torch.float64, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


# --------------------------------------------------------------------- consistency, h form
@pytest.mark.parametrize("stop", [True, False])
def test_consistency_matches_transcription_and_gradients(stop):
    ht, h1, h2 = (t.requires_grad_() for t in _h())
    N = ht.numel()
    loss = fs.consistency_loss(ht, h1, h2, stop_anchor_grad=stop)
    want = ((h1 - ht) * (h2 - ht)).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(h1.grad, (h2 - ht) / N)      # SPEC §3 gradients
        torch.testing.assert_close(h2.grad, (h1 - ht) / N)
        if stop:
            assert ht.grad is None
        else:
            torch.testing.assert_close(ht.grad, (2 * ht - h1 - h2) / N)


def test_consistency_can_be_negative_and_reductions():
    ht = torch.zeros(2, 3)
    h1 = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    h2 = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 5.0, 0.0]])
    per = fs.consistency_loss(ht, h1, h2, reduction="none")
    assert per.tolist() == [-1.0, pytest.approx(2 / 3)]
    assert fs.consistency_loss(ht, h1, h2).item() == pytest.approx((-1 + 2 / 3) / 2)
    assert fs.consistency_loss(ht, h1, h2, reduction="sum").item() == pytest.approx(-1 + 2 / 3)


def test_consistency_gradcheck_float64():
    ht, h1, h2 = (t.requires_grad_() for t in _h(shape=(3, 2, 2), seed=1))
    assert torch.autograd.gradcheck(
        lambda a, b, c: fs.consistency_loss(a, b, c, stop_anchor_grad=False), (ht, h1, h2))
    anchor = ht.detach()  # stop-gradient: h_t is a constant, so check h1 and h2 only
    assert torch.autograd.gradcheck(
        lambda b, c: fs.consistency_loss(anchor, b, c, stop_anchor_grad=True), (h1, h2))


def test_consistency_mixed_dtypes_and_layouts():
    ht, h1, h2 = _h(shape=(3, 4, 6, 5), seed=2, dtype=torch.float32)
    out = fs.consistency_loss(ht.half(), h1.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
                              h2.bfloat16(), reduction="none")
    assert out.dtype == torch.float32
    want = ((h1 - ht.half().float()) * (h2.bfloat16().float() - ht.half().float())).reshape(3, -1).mean(1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- consistency, ε form
def _eps_setup(seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B = 4
    abar_t = torch.tensor([0.3, 0.4, 0.5, 0.2], dtype=torch.float64)
    abar_s = torch.tensor([0.5, 0.45, 0.7, 0.6], dtype=torch.float64)
    sc = [abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()]
    xs = [torch.randn(B, 3, 5, generator=g, dtype=torch.float64).to(dtype) for _ in range(6)]
    return xs, [s.to(dtype) for s in sc]


@pytest.mark.parametrize("stop", [True, False])
def test_consistency_eps_form_equals_h_form(stop):
    xs, (at, st, as_, ss) = _eps_setup()
    xs = [x.requires_grad_() for x in xs]
    x_t, e_t, x1, e1, x2, e2 = xs
    v = lambda s: s.view(-1, 1, 1)  # noqa: E731
    ht = (x_t - v(st) * e_t) / v(at)
    h1 = (x1 - v(ss) * e1) / v(as_)
    h2 = (x2 - v(ss) * e2) / v(as_)
    want = fs.consistency_loss(ht, h1, h2, stop_anchor_grad=stop)
    want_g = torch.autograd.grad(want, xs, allow_unused=True)
    got = fs.consistency_loss_eps(x_t, e_t, at, st, x1, e1, x2, e2, as_, ss, stop_anchor_grad=stop)
    torch.testing.assert_close(got, want)
    got_g = torch.autograd.grad(got, xs, allow_unused=True)
    for k, (a, b) in enumerate(zip(got_g, want_g)):
        if stop and k < 2:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)


def test_consistency_eps_gradcheck_float64():
    xs, sc = _eps_setup(seed=4)
    xs = [x[:, :2, :2].contiguous().requires_grad_() for x in xs]
    assert torch.autograd.gradcheck(
        lambda *a: fs.consistency_loss_eps(a[0], a[1], sc[0], sc[1], a[2], a[3], a[4], a[5],
                                           sc[2], sc[3], stop_anchor_grad=False), xs)


def test_consistency_errors():
    a = torch.randn(2, 3)
    with pytest.raises(ValueError, match="h2"):
        fs.consistency_loss(a, a, torch.randn(2, 4))
    with pytest.raises(TypeError, match="h1"):
        fs.consistency_loss(a, a.long(), a)
    with pytest.raises(TypeError, match="stop_anchor_grad"):
        fs.consistency_loss(a, a, a, stop_anchor_grad="yes")
    with pytest.raises(ValueError, match="eps_s2"):
        fs.consistency_loss_eps(a, a, 0.5, 0.8, a, a, a, a[:1], 0.6, 0.7)
    with pytest.raises(ValueError, match="sigma_s"):
        fs.consistency_loss_eps(a, a, 0.5, 0.8, a, a, a, a, 0.6, torch.ones(3))


# --------------------------------------------------------------------- coefficients
def _schedule(T=1000):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2  # SD "scaled_linear"
    return torch.cumprod(1 - betas, 0).float(), betas


def test_alpha_sigma_from_scheduler_or_tensor():
    ac, _ = _schedule()
    t = torch.tensor([0, 10, 999])
    a, s = fs.vp_alpha_sigma(ac, t)
    assert a.dtype == torch.float32 and a.shape == (3,)
    torch.testing.assert_close(a, ac[t].double().sqrt().float())
    torch.testing.assert_close(a**2 + s**2, torch.ones(3))
    a2, s2 = fs.vp_alpha_sigma(SimpleNamespace(alphas_cumprod=ac), t)
    assert torch.equal(a, a2) and torch.equal(s, s2)
    a3, _ = fs.vp_alpha_sigma(ac, 10)
    assert a3.shape == (1,) and a3.item() == a[1].item()


def test_reverse_step_coefficients_match_ddpm_posterior():
    """For s = t − 1, c_f² is the DDPM posterior variance β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t."""
    ac, betas = _schedule()
    ac64 = ac.double()
    betas = 1 - ac64 / torch.cat([torch.ones(1, dtype=torch.float64), ac64[:-1]])
    t = torch.tensor([1, 50, 500, 999])
    c = fs.vp_reverse_step_coefficients(ac, t, t - 1)
    post_var = (1 - ac64[t - 1]) / (1 - ac64[t]) * betas[t]
    torch.testing.assert_close(c.c_f.double() ** 2, post_var, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(c.c_o.double() ** 2 + c.c_f.double() ** 2, 1 - ac64[t - 1],
                               rtol=1e-5, atol=1e-9)
    # the written-out definition for larger steps
    s = torch.tensor([0, 10, 200, 700])
    c = fs.vp_reverse_step_coefficients(SimpleNamespace(alphas_cumprod=ac), t, s)
    at, st = ac64[t].sqrt(), (1 - ac64[t]).sqrt()
    as_, ss = ac64[s].sqrt(), (1 - ac64[s]).sqrt()
    cf = (ss / st) * torch.sqrt(1 - at**2 / as_**2)
    co = torch.sqrt(torch.clamp(ss**2 - cf**2, min=0))
    for got, want in zip(c, (at, st, as_, ss, co, cf)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    same = fs.vp_reverse_step_coefficients(ac, t, t)  # s = t: identity step
    assert (same.c_f == 0).all()
    torch.testing.assert_close(same.c_o, same.sigma_t)


def test_coefficient_errors():
    ac, _ = _schedule(10)
    with pytest.raises(ValueError, match="timesteps"):
        fs.vp_alpha_sigma(ac, torch.tensor([10]))
    with pytest.raises(TypeError, match="integer"):
        fs.vp_alpha_sigma(ac, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="s must not exceed t"):
        fs.vp_reverse_step_coefficients(ac, torch.tensor([3]), torch.tensor([4]))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        fs.vp_alpha_sigma(ac.view(2, 5), 0)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        fs.vp_alpha_sigma(object(), 0)


# --------------------------------------------------------------------- reverse step
def _step_inputs(seed=5, dtype=torch.float64, shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]


def test_reverse_step_matches_formula_and_pairs():
    ac, _ = _schedule()
    c = fs.vp_reverse_step_coefficients(ac, torch.tensor([600, 400, 900]), torch.tensor([500, 399, 100]))
    h, e, xi1, xi2 = _step_inputs(dtype=torch.float32)
    v = lambda s: s.view(-1, 1, 1, 1)  # noqa: E731
    want1 = v(c.alpha_s) * h + v(c.c_o) * e + v(c.c_f) * xi1
    want2 = v(c.alpha_s) * h + v(c.c_o) * e + v(c.c_f) * xi2
    got = fs.vp_reverse_step(h, e, xi1, c.alpha_s, c.c_o, c.c_f)
    torch.testing.assert_close(got, want1)
    g1, g2 = fs.vp_reverse_step(h, e, (xi1, xi2), c.alpha_s, c.c_o, c.c_f)
    torch.testing.assert_close(g1, want1)
    torch.testing.assert_close(g2, want2)
    # ε form: ĥ = (x_t − σ_t ε̂)/α_t folded in
    x_t = v(c.alpha_t) * h + v(c.sigma_t) * e
    got = fs.vp_reverse_step_from_eps(x_t, e, [xi1, xi2], c.alpha_t, c.sigma_t, c.alpha_s,
                                      c.c_o, c.c_f)
    torch.testing.assert_close(got[0], want1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want2, rtol=1e-5, atol=1e-5)


def test_reverse_step_dtypes_layout_and_gradcheck():
    h, e, xi1, xi2 = _step_inputs()
    sc = [torch.rand(3, dtype=torch.float64) for _ in range(3)]
    args = [t.requires_grad_() for t in (h, e, xi1, xi2)]
    assert torch.autograd.gradcheck(
        lambda a, b, c1, c2: fs.vp_reverse_step(a, b, [c1, c2], *sc), args)
    assert torch.autograd.gradcheck(
        lambda a, b, c1: fs.vp_reverse_step_from_eps(a, b, c1, sc[0] + 0.5, sc[1], *sc), args[:3])
    hh = h.detach().half().to(memory_format=torch.channels_last)
    out = fs.vp_reverse_step(hh, e.detach().float(), xi1.detach().half(), *[s.float() for s in sc])
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="noise"):
        fs.vp_reverse_step(h, e, torch.randn(3, 2), *sc)
    with pytest.raises(ValueError, match="at most 2"):
        fs.vp_reverse_step(h, e, [xi1, xi1, xi1], *sc)


def test_torch_compile_fullgraph_consistency_and_step():
    xs, sc = _eps_setup(seed=6, dtype=torch.float32)
    xs = [x.requires_grad_() for x in xs]

    def f(x_t, e_t, x1, e1, x2, e2):
        y1, y2 = fs.vp_reverse_step(x_t, e_t, (x1, x2), sc[2], sc[3], sc[1] * 0.5)
        return fs.consistency_loss_eps(x_t, e_t, sc[0], sc[1], x1, e1, x2, e2, sc[2], sc[3],
                                       stop_anchor_grad=False) + (y1 * y2).mean()

    eager = f(*xs)
    g_eager = torch.autograd.grad(eager, xs)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*xs)
    g_comp = torch.autograd.grad(compiled, xs)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def test_empty_batch_gives_zero_not_nan():
    e = torch.zeros(0, 3, 4, requires_grad=True)
    z = torch.zeros(0)
    for loss in (fs.consistency_loss(e, e, e), fs.ambient_loss_vp(e, e, z, z, z, z),
                 fs.ambient_loss_ve(e, e, e, z, z)):
        assert loss.item() == 0.0
        loss.backward()
    assert e.grad.shape == e.shape
    assert fs.consistency_loss(e, e, e, reduction="none").shape == (0,)
    assert fs.vp_reverse_step(e, e, e, z, z, z).shape == e.shape


def test_torch_compile_h_form_then_eager():
    """Tracing must not leave a traced tensor in the constant-table cache."""
    from fastsoup.ops import ambient_coefficients as amb

    amb._CONSTANT_TABLES.clear()
    h = [t.float().requires_grad_() for t in _h(shape=(2, 5), seed=8)]
    f = torch.compile(lambda a, b, c: fs.consistency_loss(a, b, c, stop_anchor_grad=False),
                      fullgraph=True, backend="aot_eager")
    compiled = f(*h)
    eager = fs.consistency_loss(*h, stop_anchor_grad=False)
    torch.testing.assert_close(compiled, eager)
    assert all(type(t) is torch.Tensor for t in amb._CONSTANT_TABLES.values())
