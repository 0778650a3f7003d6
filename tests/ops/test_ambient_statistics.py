"""The ambient losses learn the *clean* denoiser from noisy data (SPEC §3).

Data: x_0 ~ N(μ, s²) per coordinate, observed only as x_n = α_n x_0 + σ_n η with one fixed
draw η per example (fastsoup.train.fixed_noise.FixedNoise). For Gaussian data the exact
denoiser at every level is linear in x_t with closed-form coefficients, so a per-level
linear model D(x_t) = w x_t + c fitted by minimising a loss tells which denoiser the loss
targets:

* minimising the ambient loss on the noisy data recovers the clean coefficients;
* ordinary denoising on the same noisy data recovers the coefficients of the noisy
  distribution (what a model trained naively on noisy images learns).

The gaps between the two are ≥ 0.07 in w; the tolerances (0.02) are several standard
errors of the fit yet far below the gaps, so a wrong loss fails. Everything is seeded.
"""
import math

import pytest
import torch

import fastsoup as fs
from fastsoup.train.fixed_noise import FixedNoise

N_EXAMPLES = 2048     # examples (each with its fixed η)
DIM = 32              # iid coordinates per example
REPEATS = 4           # fresh training noise z per example and level
TOL = 0.02


def _fit(loss_fn, levels: int, iters: int = 60):
    """Minimise loss_fn(w, c) over per-level (w, c) with L-BFGS (the loss is quadratic)."""
    w = torch.zeros(levels, dtype=torch.float32, requires_grad=True)
    c = torch.zeros(levels, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], lr=1.0, max_iter=iters, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(w, c)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().double(), c.detach().double()


def _rows(level_values, n_rows):
    """Per-row level index and value for L levels × n_rows rows each."""
    L = len(level_values)
    idx = torch.arange(L).repeat_interleave(n_rows)
    return idx, torch.tensor(level_values, dtype=torch.float32)[idx]


def test_ve_ambient_loss_recovers_clean_denoiser():
    mu, s, sigma_n = 0.5, 1.0, 0.8
    sigmas = [1.0, 1.5, 2.5]
    g = torch.Generator().manual_seed(1234)
    x0 = mu + s * torch.randn(N_EXAMPLES, DIM, generator=g)
    eta = FixedNoise(seed=7).batch(range(N_EXAMPLES), (DIM,))
    x_n = x0 + sigma_n * eta                                      # the only data we use
    rows = len(sigmas) * N_EXAMPLES * REPEATS
    lvl, st = _rows(sigmas, N_EXAMPLES * REPEATS)
    xn_rows = x_n.repeat(REPEATS, 1).repeat(len(sigmas), 1)
    z = torch.randn(rows, DIM, generator=g)
    x_t = xn_rows + (st**2 - sigma_n**2).sqrt()[:, None] * z      # ambient forward process
    sn = torch.full((rows,), sigma_n)

    def ambient(w, c):
        return fs.ambient_loss_ve(w[lvl][:, None] * x_t + c[lvl][:, None], x_t, xn_rows, st, sn)

    w_amb, c_amb = _fit(ambient, len(sigmas))

    # ordinary denoising on the same noisy data: x_t' = x_n + σ_t z, target x_n
    x_t_naive = xn_rows + st[:, None] * z

    def naive(w, c):
        pred = w[lvl][:, None] * x_t_naive + c[lvl][:, None]
        return fs.per_sample_mse(pred, xn_rows).mean()

    w_nv, c_nv = _fit(naive, len(sigmas))

    for i, sig in enumerate(sigmas):
        w_clean = s**2 / (s**2 + sig**2)                           # E[x_0 | x_t], clean data
        w_noisy = (s**2 + sigma_n**2) / (s**2 + sigma_n**2 + sig**2)
        assert abs(w_clean - w_noisy) > 0.06
        assert w_amb[i].item() == pytest.approx(w_clean, abs=TOL), (sig, w_amb, w_clean)
        assert c_amb[i].item() == pytest.approx(mu * (1 - w_clean), abs=TOL)
        assert w_nv[i].item() == pytest.approx(w_noisy, abs=TOL), (sig, w_nv, w_noisy)
        assert c_nv[i].item() == pytest.approx(mu * (1 - w_noisy), abs=TOL)
        assert abs(w_nv[i].item() - w_clean) > 3 * TOL


@pytest.mark.parametrize("mode", ["x0", "eps"])
def test_vp_ambient_loss_recovers_clean_denoiser(mode):
    mu, s = 0.5, 2.0
    abar_n = 0.5
    abars = [0.35, 0.2, 0.08]
    alpha_n, sigma_n = math.sqrt(abar_n), math.sqrt(1 - abar_n)
    g = torch.Generator().manual_seed(4321)
    x0 = mu + s * torch.randn(N_EXAMPLES, DIM, generator=g)
    eta = FixedNoise(seed=11).batch(range(N_EXAMPLES), (DIM,))
    x_n = alpha_n * x0 + sigma_n * eta                            # the only data we use
    rows = len(abars) * N_EXAMPLES * REPEATS
    lvl, abar_t = _rows(abars, N_EXAMPLES * REPEATS)
    alpha_t, sigma_t = abar_t.sqrt(), (1 - abar_t).sqrt()
    an, sn = torch.full((rows,), alpha_n), torch.full((rows,), sigma_n)
    xn_rows = x_n.repeat(REPEATS, 1).repeat(len(abars), 1)
    z = torch.randn(rows, DIM, generator=g)
    a = alpha_t / alpha_n
    b = (sigma_t**2 - a**2 * sigma_n**2).clamp_min(0).sqrt()
    x_t = a[:, None] * xn_rows + b[:, None] * z                   # ambient forward process

    def ambient(w, c):
        eps_pred = w[lvl][:, None] * x_t + c[lvl][:, None]
        return fs.ambient_loss_vp(eps_pred, z, alpha_t, sigma_t, an, sn, mode=mode)

    w_amb, c_amb = _fit(ambient, len(abars))

    # ordinary ε-prediction training on the same noisy data: x_t' = α_t x_n + σ_t ε
    x_t_naive = alpha_t[:, None] * xn_rows + sigma_t[:, None] * z

    def naive(w, c):
        eps_pred = w[lvl][:, None] * x_t_naive + c[lvl][:, None]
        return fs.per_sample_mse(eps_pred, z).mean()

    w_nv, c_nv = _fit(naive, len(abars))

    var_n = abar_n * s**2 + sigma_n**2                            # variance of x_n
    for i, ab in enumerate(abars):
        at, st = math.sqrt(ab), math.sqrt(1 - ab)
        w_clean = st / (ab * s**2 + st**2)                        # E[ε | x_t], clean data
        w_noisy = st / (ab * var_n + st**2)
        assert abs(w_clean - w_noisy) > 0.07
        assert w_amb[i].item() == pytest.approx(w_clean, abs=TOL), (ab, w_amb, w_clean)
        assert c_amb[i].item() == pytest.approx(-w_clean * at * mu, abs=TOL)
        assert w_nv[i].item() == pytest.approx(w_noisy, abs=TOL), (ab, w_nv, w_noisy)
        assert c_nv[i].item() == pytest.approx(-w_noisy * at * alpha_n * mu, abs=TOL)
        assert abs(w_nv[i].item() - w_clean) > 3 * TOL
