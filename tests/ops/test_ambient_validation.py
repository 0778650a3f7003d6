"""Ambient losses: schedule scalars are validated (an invalid one raises naming the
argument, never silently masks a sample) and finite valid inputs never give NaN/inf."""
import math

import pytest
import torch

import fastsoup as fs

NAN = float("nan")


def _vp(**over):
    a = dict(alpha_t=0.6, sigma_t=0.8, alpha_n=0.95, sigma_n=math.sqrt(1 - 0.95 ** 2))
    a.update(over)
    return a


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("name, value, match", [
    ("alpha_t", NAN, "finite"), ("sigma_t", NAN, "finite"), ("alpha_n", NAN, "finite"),
    ("sigma_n", NAN, "finite"), ("sigma_t", float("inf"), "finite"),
    ("alpha_n", 0.0, "> 0"), ("alpha_t", 0.0, "> 0"), ("alpha_t", -0.5, "> 0"),
    ("alpha_n", -0.1, "> 0"), ("sigma_t", -0.1, ">= 0"), ("sigma_n", -0.2, ">= 0"),
])
def test_vp_invalid_scalars_raise_naming_the_argument(as_tensor, name, value, match):
    eps, z = torch.randn(3, 8), torch.randn(3, 8)
    kw = _vp()
    if as_tensor:
        kw = {k: torch.full((3,), float(v)) for k, v in kw.items()}
        kw[name] = kw[name].clone()
        kw[name][1] = value                       # one bad sample is enough
    else:
        kw[name] = value
    with pytest.raises(ValueError, match=match) as info:
        fs.ambient_loss_vp(eps, z, **kw)
    assert str(info.value).startswith(name), str(info.value)


@pytest.mark.parametrize("name, value, match", [
    ("sigma_t", NAN, "finite"), ("sigma_n", NAN, "finite"), ("sigma_t", -1.0, ">= 0"),
    ("sigma_n", -0.5, ">= 0"), ("sigma_n", float("inf"), "finite"),
])
def test_ve_invalid_scalars_raise_naming_the_argument(name, value, match):
    x = [torch.randn(2, 5) for _ in range(3)]
    kw = dict(sigma_t=torch.tensor([2.0, 3.0]), sigma_n=torch.tensor([0.5, 0.5]))
    kw[name] = kw[name].clone()
    kw[name][0] = value
    with pytest.raises(ValueError, match=match) as info:
        fs.ambient_loss_ve(*x, **kw)
    assert str(info.value).startswith(name)


def test_ve_tiny_sigma_t_never_gives_nan():
    x = [torch.randn(2, 5) for _ in range(3)]
    # the EDM weight λ(1e-30) ≈ 1e60 does not fit float32: an error naming sigma_t, not NaN
    with pytest.raises(ValueError, match=r"^sigma_t.*overflow"):
        fs.ambient_loss_ve(*x, sigma_t=1e-30, sigma_n=0.0)
    with pytest.raises(ValueError, match=r"^sigma_t.*overflow"):
        fs.ambient_loss_ve(*x, sigma_t=torch.tensor([1.0, 1e-200], dtype=torch.float64),
                           sigma_n=0.0)
    # small but representable: finite
    for st in (1e-3, 1e-10, 1e-18):
        loss = fs.ambient_loss_ve(*x, sigma_t=st, sigma_n=0.0)
        assert torch.isfinite(loss), st


def test_vp_tiny_alpha_t_never_gives_inf():
    eps, z = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"^alpha_t.*overflow"):
        fs.ambient_loss_vp(eps, z, **_vp(alpha_t=1e-30, sigma_t=1.0))
    # ε-mode has no (b/a)² weight: finite
    assert torch.isfinite(fs.ambient_loss_vp(eps, z, **_vp(alpha_t=1e-30, sigma_t=1.0), mode="eps"))
    assert torch.isfinite(fs.ambient_loss_vp(eps, z, **_vp(alpha_t=1e-6, sigma_t=1.0)))


def test_masking_by_sigma_order_still_works():
    # σ_t < σ_n is a documented mask (not an error)
    eps, z = torch.randn(3, 10), torch.randn(3, 10)
    assert fs.ambient_loss_vp(eps, z, 0.9, 0.3, 0.6, 0.8).item() == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_random_valid_inputs_are_finite(seed):
    g = torch.Generator().manual_seed(seed)
    B = 64
    abar = torch.rand(B, generator=g, dtype=torch.float64) ** 8   # down to ~1e-30
    abar_n = torch.rand(B, generator=g, dtype=torch.float64).clamp_min(abar)
    eps, z = torch.randn(B, 6, generator=g), torch.randn(B, 6, generator=g)
    for mode in ("x0", "eps"):
        try:
            loss = fs.ambient_loss_vp(eps, z, abar.sqrt(), (1 - abar).sqrt(), abar_n.sqrt(),
                                      (1 - abar_n).sqrt(), mode=mode, reduction="none")
        except ValueError as exc:  # only the documented overflow may refuse
            assert "overflow" in str(exc)
            continue
        assert torch.isfinite(loss).all()
