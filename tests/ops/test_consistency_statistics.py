"""The consistency loss with fused reverse steps vanishes exactly for the true denoiser.

Gaussian data x_0 ~ N(μ, s²): the exact denoiser h(x, t) = E[x_0 | x_t = x] is linear in
x, and E[h(x_s) | x_t] = h(x_t) (martingale). h being linear, E[h(x_s)] depends only on the
mean of the reverse step, which the DDPM step ``x_s = α_s ĥ + c_o ε̂ + c_f ξ`` gets right;
so with two independent steps the estimator (h_1 − h_t)(h_2 − h_t) has expectation 0 for
the true denoiser and (h_s(E x_s) − h_t)² > 0 for a denoiser that is inconsistent across
levels (here: the true one at t, that of other data at s; the situation of an ambient model
below σ_n). This checks the reverse-step coefficients, the fused step and the consistency
loss together (h and ε forms).
"""
import torch

import fastsoup as fs

MU, S = 0.3, 1.7


def _schedule(T=1000):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _denoiser(alpha, sigma, s=S):
    """x0-prediction and ε-prediction of the exact denoiser for N(μ, s²) data (per row)."""
    gain = alpha * s**2 / (alpha**2 * s**2 + sigma**2)

    def h(x):
        return MU + gain.view(-1, 1) * (x - alpha.view(-1, 1) * MU)

    def eps(x):
        return (x - alpha.view(-1, 1) * h(x)) / sigma.view(-1, 1)

    return h, eps


def _losses(s_at_s):
    """Loss for the exact denoiser at t and the denoiser of N(μ, s_at_s²) data at s."""
    g = torch.Generator().manual_seed(2024)
    ac = _schedule()
    B, D = 64, 4096
    t = torch.randint(300, 900, (B,), generator=g)
    s = t - torch.randint(1, 200, (B,), generator=g)
    c = fs.vp_reverse_step_coefficients(ac, t, s)
    x0 = MU + S * torch.randn(B, D, generator=g)
    x_t = c.alpha_t[:, None] * x0 + c.sigma_t[:, None] * torch.randn(B, D, generator=g)
    h_t_fn, eps_t_fn = _denoiser(c.alpha_t, c.sigma_t, S)
    h_s_fn, eps_s_fn = _denoiser(c.alpha_s, c.sigma_s, s_at_s)
    h_t, e_t = h_t_fn(x_t), eps_t_fn(x_t)
    xi = (torch.randn(B, D, generator=g), torch.randn(B, D, generator=g))
    x1, x2 = fs.vp_reverse_step(h_t, e_t, xi, c.alpha_s, c.c_o, c.c_f)
    x1e, x2e = fs.vp_reverse_step_from_eps(x_t, e_t, xi, c.alpha_t, c.sigma_t, c.alpha_s, c.c_o, c.c_f)
    torch.testing.assert_close(x1e, x1, rtol=1e-4, atol=1e-4)
    loss_h = fs.consistency_loss(h_t, h_s_fn(x1), h_s_fn(x2))
    loss_eps = fs.consistency_loss_eps(x_t, e_t, c.alpha_t, c.sigma_t, x1, eps_s_fn(x1),
                                       x2, eps_s_fn(x2), c.alpha_s, c.sigma_s)
    # the scale of the estimator's terms, to express tolerances relative to it
    spread = ((h_s_fn(x1) - h_t) ** 2).mean()
    return loss_h.item(), loss_eps.item(), spread.item()


def test_consistency_loss_vanishes_for_the_exact_denoiser():
    loss_h, loss_eps, spread = _losses(S)
    assert abs(loss_h) < 0.01 * spread, (loss_h, spread)
    assert abs(loss_eps - loss_h) < 1e-3 * spread + 1e-6


def test_consistency_loss_detects_a_wrong_denoiser():
    good_h, _, spread = _losses(S)
    bad_h, bad_eps, _ = _losses(1.0)  # N(μ, 1) denoiser at s, N(μ, S²) at t: inconsistent
    assert bad_h > 0.05 * spread and bad_h > 10 * abs(good_h), (bad_h, good_h, spread)
    assert abs(bad_eps - bad_h) < 1e-3 * spread + 1e-6
