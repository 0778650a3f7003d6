"""The VP coefficient ``b = sqrt(σ_t² − a²σ_n²)`` is exactly 0 at ``t = t_n`` however the
compiler contracts it.

Compiled Triton contracts ``x*x − y`` into one FMA, which returns the rounding residual of
``y`` instead of 0 (the interpreter and the reference never fuse, so no CPU run shows it).
This test evaluates both the old and the shipped expression under an exact FMA model (the
fused product is rounded once, computed with rationals) over the 1000 timesteps of the
DDPM linear schedule: the old form leaves ``b ≈ 1e-9·σ`` at hundreds of them, the shipped
form gives exactly 0 at all. The compiled-code side (the coefficient kernel compiles with
``enable_fp_fusion=False`` and no FMA) is in test_compiled_contracts.py.
"""
import math
from fractions import Fraction

import torch

from fastsoup.ops.ambient_coefficients import vp_loss_coefficients


def _fma(x: float, y: float, z: float) -> float:
    return float(Fraction(x) * Fraction(y) + Fraction(z))  # rounded once, to nearest


def _schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)  # diffusers' DDPM default
    abar = torch.cumprod(1.0 - betas, 0).double()
    return abar.sqrt().tolist(), (1 - abar).sqrt().tolist()


def test_old_form_under_fma_leaves_a_residual_at_t_equal_tn():
    alphas, sigmas = _schedule()
    nonzero = 0
    for an, sn in zip(alphas, sigmas):
        at, st = an, sn                         # t = t_n
        a = at / an
        y = a * a * sn * sn
        nonzero += _fma(st, st, -y) > 0         # st*st − y contracted
    assert nonzero > 100                        # the wrong result the compiled code gave


def test_shipped_form_is_exact_under_any_contraction():
    alphas, sigmas = _schedule()
    for an, sn in zip(alphas, sigmas):
        at, st = an, sn
        a = at / an
        asn = a * sn
        unfused = (st - asn) * (st + asn)
        fused = _fma(st - asn, st + asn, 0.0)   # the only contraction the form admits
        assert unfused == 0.0 and fused == 0.0
        assert math.sqrt(max(fused, 0.0)) == 0.0


def test_reference_coefficients_give_zero_loss_weight_at_tn():
    alphas, sigmas = _schedule()
    at = torch.tensor(alphas, dtype=torch.float64)
    st = torch.tensor(sigmas, dtype=torch.float64)
    for mode in ("x0", "eps"):
        a, b, k, c, valid, live = vp_loss_coefficients(at, st, at, st, mode)
        assert torch.all(b == 0) and torch.all(k == 0) and torch.all(c == 0)
        assert torch.all(valid) and not torch.any(live)
