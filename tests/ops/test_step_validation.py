"""The consistency loss in ε form and the reverse step validate their schedule scalars like
the ambient losses: NaN/inf, α ≤ 0 and negative σ, c_o, c_f raise naming the argument, and
coefficients that would overflow raise instead of giving inf/NaN samples."""
import math

import pytest
import torch

import fastsoup as fs


def _eps_args(B=3):
    torch.manual_seed(0)
    names = ("x_t", "eps_t", "x_s1", "eps_s1", "x_s2", "eps_s2")
    return {n: torch.randn(B, 4, 5) for n in names}, dict(alpha_t=torch.full((B,), 0.8), sigma_t=torch.full((B,), 0.6),
                    alpha_s=torch.full((B,), 0.9), sigma_s=torch.full((B,), math.sqrt(0.19)))


@pytest.mark.parametrize("name,value,match", [
    ("alpha_t", float("nan"), "alpha_t must be finite"),
    ("alpha_s", 0.0, "alpha_s must be"),
    ("sigma_t", -0.1, "sigma_t must be"),
])
def test_consistency_eps_scalars(name, value, match):
    xs, kw = _eps_args()
    kw[name] = kw[name].clone()
    kw[name][1] = value
    with pytest.raises(ValueError, match=match):
        fs.consistency_loss_eps(**xs, **kw)


def test_consistency_eps_tiny_alpha_raises_instead_of_inf():
    xs, kw = _eps_args()
    kw["alpha_t"] = torch.tensor([0.8, 1e-39, 0.8])
    with pytest.raises(ValueError, match="alpha_t is too small"):
        fs.consistency_loss_eps(**xs, **kw)


@pytest.mark.parametrize("name,value", [("alpha_s", -1.0), ("c_o", float("inf")), ("c_f", -0.5)])
def test_reverse_step_scalars(name, value):
    x0, eps, xi = (torch.randn(2, 8) for _ in range(3))
    kw = dict(alpha_s=0.9, c_o=0.3, c_f=0.2)
    kw[name] = torch.tensor([kw[name], value])
    with pytest.raises(ValueError, match=name):
        fs.vp_reverse_step(x0, eps, xi, **kw)


def test_reverse_step_from_eps_tiny_alpha_t_raises():
    x, eps, xi = (torch.randn(2, 8) for _ in range(3))
    with pytest.raises(ValueError, match="alpha_t is too small"):
        fs.vp_reverse_step_from_eps(x, eps, xi, alpha_t=torch.tensor([0.9, 1e-40]),
                                    sigma_t=0.4, alpha_s=0.95, c_o=0.2, c_f=0.1)


def test_valid_steps_still_run():
    x, eps, xi = (torch.randn(2, 8) for _ in range(3))
    out = fs.vp_reverse_step_from_eps(x, eps, (xi, -xi), alpha_t=0.9, sigma_t=0.4, alpha_s=0.95,
                                      c_o=0.2, c_f=0.1)
    assert all(torch.isfinite(o).all() for o in out)


def test_schedule_scalars_are_vouched_until_modified_in_place():
    """Scalars from fs.vp_alpha_sigma skip the value checks (no host sync); an in-place
    change revokes that, so a NaN written into them is still caught."""
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    a_t, s_t = fs.vp_alpha_sigma(ac, torch.tensor([500, 600]))
    a_n, s_n = fs.vp_alpha_sigma(ac, torch.tensor([100, 100]))
    eps, z = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.isfinite(fs.ambient_loss_vp(eps, z, a_t, s_t, a_n, s_n))
    a_t[1] = float("nan")
    with pytest.raises(ValueError, match="alpha_t must be finite"):
        fs.ambient_loss_vp(eps, z, a_t, s_t, a_n, s_n)


def test_an_invalid_schedule_is_not_vouched_for():
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    ac[999] = 0.0                      # α = 0 at the last step: scalars are checked
    a_t, s_t = fs.vp_alpha_sigma(ac, torch.tensor([999, 10]))
    with pytest.raises(ValueError, match="alpha_t must be"):
        fs.ambient_loss_vp(torch.randn(2, 8), torch.randn(2, 8), a_t, s_t, 0.9, 0.3)
