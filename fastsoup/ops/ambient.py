"""Ambient diffusion: the fused double-Tweedie losses (SPEC §3).

Training data are noisy (``x_n = x_0 + σ_n η`` in VE, ``x_n = α_n x_0 + σ_n η`` in VP) with
one fixed noise draw per image (see :func:`fastsoup.train.ambient_vp_dataset`). The losses below compare
the network's implied ``E[x_n | x_t]`` with the observed ``x_n``; their minimiser is the
*clean* denoiser ``E[x_0 | x_t]`` at every level ``σ_t > σ_n``.

Public ops:

* :func:`ambient_loss_vp`: ε-network, VP schedule (x0-mode and ε-mode);
* :func:`ambient_loss_ve`: x0-network, VE / EDM schedule (pseudo-target form).

The ops of the same family live beside this one: the coefficient tables
(:mod:`.ambient_coefficients`), the row engines (:mod:`.rows`), the schedule helpers
(:mod:`.schedule`), the reverse sampler (:mod:`.reverse_step`) and the consistency loss
(:mod:`.consistency`). Each loss is one row bilinear form driven by a ``[B, 16]``
coefficient table: about five launches forward (table, reduction kernel, a few ``[B]``
reductions) and one backward.

A VP training step (SDXL-style ε-network, data at level ``t_n``; ``scheduler`` is any
diffusers scheduler, ``x_n`` a batch from :class:`fastsoup.train.AmbientDataset`)::

    t = torch.randint(t_n, T, (B,), device=dev)
    alpha_t, sigma_t = fs.vp_alpha_sigma(scheduler, t)
    alpha_n, sigma_n = fs.vp_alpha_sigma(scheduler, torch.full_like(t, t_n))
    a = alpha_t / alpha_n
    b = (sigma_t**2 - a**2 * sigma_n**2).clamp_min(0).sqrt()
    z = torch.randn_like(x_n)
    x_t = a.view(-1, 1, 1, 1) * x_n + b.view(-1, 1, 1, 1) * z
    eps_pred = unet(x_t, t, cond).sample
    loss = fs.ambient_loss_vp(eps_pred, z, alpha_t, sigma_t, alpha_n, sigma_n, mode="x0")

Per-sample noise-schedule scalars (``alpha_t``, ``sigma_t``, ...) are constants of the
schedule: they may be Python numbers, 0-d tensors or ``[B]`` float tensors, but not tensors
that require grad (a ``ValueError`` says so; pass ``.detach()``). Gradients flow to the
data tensors and to ``weight``.
"""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from .. import _backend
from ._checks import (DeferredChecks, Scalar, as_weight, check_data, check_reduction,
                      per_sample_scalar)
from .ambient_coefficients import check_finite_table, coefficient_table
from .rows import acc_dtype, row_bilinear
from ..kernels.abi import COL_VALID

OP_VP = "ambient_loss_vp"
OP_VE = "ambient_loss_ve"
for _op in (OP_VP, OP_VE):
    _backend.register_op(_op, ("reference", "triton"), default_gpu="triton")


def _reduce(per_sample: Tensor, valid: Tensor, weight, reduction: str) -> Tensor:
    """Weight the ``[B]`` losses, then reduce; the mean divides by the ``valid`` count
    (``valid``: the 0/1 validity column of the table; the result is 0 when none is valid)."""
    w = as_weight(weight, per_sample.shape[0], per_sample.device)
    if w is not None:
        per_sample = per_sample * w.to(per_sample.dtype)  # fp32 results (fp64 for fp64 data)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1)


# ----------------------------------------------------------------------- VP loss
def ambient_loss_vp(eps_pred: Tensor, extra_noise: Tensor, alpha_t: Scalar, sigma_t: Scalar,
                    alpha_n: Scalar, sigma_n: Scalar, mode: str = "x0",
                    weight: Optional[Scalar] = None, reduction: str = "mean") -> Tensor:
    """Ambient (double-Tweedie) loss for an ε-predicting network on a VP schedule.

    The data are ``x_n = α_n x_0 + σ_n η`` (``η`` fixed per image); training draws
    ``t ≥ t_n`` and ``z ~ N(0, I)`` and feeds the network ``x_t = a x_n + b z`` with

        ``a = α_t/α_n``,  ``b = sqrt(σ_t² − a² σ_n²)``,  ``r = z − (b/σ_t) ε̂``.

    Per sample (``mean`` over the ``D`` elements of a sample):

    * ``mode="x0"`` (the reference configs): ``ℓ = mean((b/a)² r²) = mean((x̂_n − x_n)²)``
      where ``x̂_n = α_n x̂_0 + (a σ_n²/σ_t) ε̂`` is the double-Tweedie estimate of ``x_n``;
    * ``mode="eps"``: ``ℓ = mean(r²) = mean((ẑ − z)²)`` with ``ẑ = (x_t − a x̂_n)/b``.

    Neither needs ``x_t`` or ``x_n``. Samples with ``σ_t < σ_n`` are masked: ``ℓ = 0``, no
    gradient, and they leave the denominator of the mean. At ``b = 0`` (``t = t_n``) the
    loss and its gradient are exactly zero in both modes (ε-mode would be 0/0); such a
    sample still counts in the denominator. Never NaN for finite inputs.

    Args:
        eps_pred: ``ε̂``, ``[B, ...]`` float16/bfloat16/float32 (any strides).
        extra_noise: ``z``, same shape (its dtype may differ).
        alpha_t, sigma_t, alpha_n, sigma_n: per-sample schedule values ``[B]`` (or numbers);
            constants, must not require grad. Checked (``ValueError`` naming the argument):
            finite, ``α > 0``, ``σ ≥ 0``; an ``alpha_t/alpha_n`` so small that the x0-mode
            weight ``(b/a)²`` overflows float32 (below ~1e-19) is refused too. One host
            sync for all of it (none while compiling: the checks are skipped then).
        mode: ``"x0"`` or ``"eps"``.
        weight: optional per-sample weight (number or ``[B]`` tensor; differentiable).
        reduction: ``"mean"`` (``Σ_i w_i ℓ_i / #valid``, 0 if none is valid), ``"sum"``,
            or ``"none"`` (fp32 ``[B]``, masked samples 0: compose it with
            :func:`fastsoup.low_loss_keep_mask`).

    Returns:
        float32 (float64 for float64 inputs): a scalar, or ``[B]`` for ``"none"``.
        Gradient: ``∂L/∂ε̂_ij = −2 c_i (b_i/σ_t,i) r_ij w_i / (D·V)`` (``V`` valid samples).
    """
    if mode not in ("x0", "eps"):
        raise ValueError(f"mode must be 'x0' or 'eps', got {mode!r}")
    check_reduction(reduction)
    check_data(("eps_pred", "extra_noise"), (eps_pred, extra_noise))
    B, dev = eps_pred.shape[0], eps_pred.device
    checks = DeferredChecks()
    scalars = [per_sample_scalar(n, v, B, dev, sign, checks) for n, v, sign in (
        ("alpha_t", alpha_t, "positive"), ("sigma_t", sigma_t, "nonnegative"),
        ("alpha_n", alpha_n, "positive"), ("sigma_n", sigma_n, "nonnegative"))]
    # table: A = B = (−k, 1) over (ε̂, z) so u = r; scale c; see vp_loss_coefficients
    coef = coefficient_table(OP_VP, "vp_" + mode, scalars, acc_dtype((eps_pred, extra_noise)))
    check_finite_table(checks, coef, (("alpha_t", scalars[0]), ("alpha_n", scalars[2])),
                       "the x0-mode weight (b/a)² with a = alpha_t/alpha_n would overflow "
                       "(use mode='eps' or larger alpha_t)")
    checks.run()  # one host sync for every data-dependent check
    per_sample = row_bilinear(OP_VP, [eps_pred, extra_noise], coef, square=True)
    return _reduce(per_sample, coef[:, COL_VALID], weight, reduction)


# ----------------------------------------------------------------------- VE loss
def ambient_loss_ve(x0_pred: Tensor, x_t: Tensor, x_n: Tensor, sigma_t: Scalar,
                    sigma_n: Scalar, sigma_data: float = 0.5, weight: Optional[Scalar] = None,
                    reduction: str = "mean") -> Tensor:
    """Ambient (double-Tweedie) loss for an x0-predicting (EDM) network on a VE schedule.

    The data are ``x_n = x_0 + σ_n η`` (``η`` fixed per image); training draws
    ``σ_t > σ_n`` and feeds ``x_t = x_n + sqrt(σ_t² − σ_n²) z``. With ``D_θ`` the
    prediction, the double-Tweedie estimate ``x̂_n = (σ_n²/σ_t²) x_t + (1 − σ_n²/σ_t²) D_θ``
    and ``λ(σ_t) = (σ_t² + σ_d²)/(σ_t σ_d)²``, the loss per sample is

        ``λ · σ_t⁴/(σ_t² − σ_n²)² · mean((x̂_n − x_n)²) = λ · mean((D_θ − y)²)``,
        ``y = (σ_t² x_n − σ_n² x_t)/(σ_t² − σ_n²)``,

    normalised by the ``D`` elements of a sample (``mean``, not the sum ``‖·‖²``: multiply
    by ``D`` for the sum). Samples with ``σ_t ≤ σ_n`` are masked (``ℓ = 0``, no gradient,
    out of the denominator; ``σ_t = σ_n`` would divide by zero). Never NaN for finite
    inputs.

    Args:
        x0_pred: ``D_θ(x_t, σ_t)``, ``[B, ...]`` float16/bfloat16/float32 (any strides).
        x_t, x_n: the network input and the noisy data, same shape (dtypes may differ).
        sigma_t, sigma_n: per-sample noise levels ``[B]`` (or numbers), constants;
            finite and ``≥ 0`` (``ValueError`` naming the argument otherwise), and
            ``sigma_t`` large enough that ``λ(σ_t)`` fits float32 (above ~1e-19). One
            host sync for these checks (skipped while compiling).
        sigma_data: ``σ_d`` of the EDM weighting (default 0.5).
        weight, reduction: as in :func:`ambient_loss_vp`.

    Returns:
        float32 (float64 for float64 inputs): a scalar, or ``[B]`` for ``"none"``.
        Gradient: ``∂L/∂D_θ = 2 λ_i w_i (D_θ − y)/(D·V)``; ``x_t`` and ``x_n`` receive
        gradients too when they require grad.
    """
    check_reduction(reduction)
    check_data(("x0_pred", "x_t", "x_n"), (x0_pred, x_t, x_n))
    if not (isinstance(sigma_data, (int, float)) and not isinstance(sigma_data, bool)
            and math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"sigma_data must be a positive number, got {sigma_data!r}")
    B, dev = x0_pred.shape[0], x0_pred.device
    checks = DeferredChecks()
    scalars = [per_sample_scalar("sigma_t", sigma_t, B, dev, "nonnegative", checks),
               per_sample_scalar("sigma_n", sigma_n, B, dev, "nonnegative", checks)]
    # table: A = B = (1, −p, −q) over (D_θ, x_n, x_t) so u = D_θ − y; scale λ
    coef = coefficient_table(OP_VE, "ve", scalars, acc_dtype((x0_pred, x_t, x_n)),
                             param=sigma_data)
    check_finite_table(checks, coef, (("sigma_t", scalars[0]), ("sigma_n", scalars[1])),
                       "the EDM weight λ(σ_t) = (σ_t² + σ_d²)/(σ_t σ_d)², or the "
                       "pseudo-target's σ_t²/(σ_t² − σ_n²), would overflow")
    checks.run()  # one host sync for every data-dependent check
    per_sample = row_bilinear(OP_VE, [x0_pred, x_n, x_t], coef, square=True)
    return _reduce(per_sample, coef[:, COL_VALID], weight, reduction)
