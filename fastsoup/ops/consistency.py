"""Consistency loss below the data noise level (SPEC §3, "Consistency loss below σ_n").

The exact denoiser is a martingale along the reverse process: ``E[h(x_s, s) | x_t] = h(x_t,
t)`` for ``s < t``. With two independent reverse samples ``x_s⁽¹⁾``, ``x_s⁽²⁾`` drawn from the
same ``x_t`` (:func:`fastsoup.vp_reverse_step`), the unbiased estimator of the squared
violation is ``L_c = mean[(h_1 − h_t)(h_2 − h_t)]`` (elementwise products; it can be
negative). Both ops below are one fused row reduction
(:func:`fastsoup.ops.rows.row_bilinear`): inputs are read once in the forward pass and
once in the backward pass, which writes the gradients directly.
"""
from __future__ import annotations


from torch import Tensor

from .. import _backend
from ._checks import DeferredChecks, Scalar, check_data, check_reduction, per_sample_scalar
from .ambient_coefficients import check_finite_table, coefficient_table, consistency_table
from .rows import acc_dtype, row_bilinear

OP_CONSISTENCY = "consistency_loss"
_backend.register_op(OP_CONSISTENCY, ("reference", "triton"), default_gpu="triton")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    # an empty batch gives 0, not the NaN of an empty mean
    return total if reduction == "sum" else total / max(per_sample.shape[0], 1)


def consistency_loss(h_anchor: Tensor, h1: Tensor, h2: Tensor, stop_anchor_grad: bool = True,
                     reduction: str = "mean") -> Tensor:
    """``L_c = mean[(h_1 − h_t)(h_2 − h_t)]`` over every element of the batch.

    Args:
        h_anchor: ``h_t = h(x_t, t)``, the x0-prediction at the anchor, ``[B, ...]``
            float16/bfloat16/float32 (any strides).
        h1, h2: x0-predictions at the two reverse samples ``x_s⁽¹⁾``, ``x_s⁽²⁾`` (same shape;
            dtypes may differ).
        stop_anchor_grad: ``True`` treats ``h_t`` as a constant (the SDXL reference code,
            ``with_grad=False``); ``False`` lets the gradient reach it (the EDM code).
        reduction: ``"mean"`` (over all ``N = B·D`` elements), ``"sum"`` (of the per-sample
            means) or ``"none"`` (fp32 ``[B]`` per-sample means).

    Returns:
        float32 (float64 for float64 inputs). Gradients (``"mean"``):
        ``∂L/∂h_1 = (h_2 − h_t)/N``, ``∂L/∂h_2 = (h_1 − h_t)/N`` and, only when
        ``stop_anchor_grad=False``, ``∂L/∂h_t = (2h_t − h_1 − h_2)/N``.
    """
    check_reduction(reduction)
    check_data(("h_anchor", "h1", "h2"), (h_anchor, h1, h2))
    if not isinstance(stop_anchor_grad, bool):
        raise TypeError(f"stop_anchor_grad must be a bool, got {type(stop_anchor_grad).__name__}")
    if stop_anchor_grad:
        h_anchor = h_anchor.detach()
    coef = consistency_table(h1.shape[0], h1.device, acc_dtype((h_anchor, h1, h2)))
    per_sample = row_bilinear(OP_CONSISTENCY, [h_anchor, h1, h2], coef, square=False)
    return _reduce(per_sample, reduction)


def consistency_loss_eps(x_t: Tensor, eps_t: Tensor, alpha_t: Scalar, sigma_t: Scalar,
                         x_s1: Tensor, eps_s1: Tensor, x_s2: Tensor, eps_s2: Tensor,
                         alpha_s: Scalar, sigma_s: Scalar, stop_anchor_grad: bool = True,
                         reduction: str = "mean") -> Tensor:
    """:func:`consistency_loss` for an ε-predicting network (VP), fused.

    The x0-predictions ``h = (x − σ ε̂)/α`` are formed inside the kernel, per element:
    ``h_t`` from ``(x_t, ε̂_t, α_t, σ_t)`` and ``h_1``, ``h_2`` from the two reverse samples
    ``(x_s⁽ⁱ⁾, ε̂_s⁽ⁱ⁾)`` at level ``(α_s, σ_s)``; none of the three ``h`` tensors is
    materialised.

    Args:
        x_t, eps_t: the anchor input and the network's ``ε̂`` there, ``[B, ...]``.
        alpha_t, sigma_t: anchor schedule values, ``[B]`` or numbers (constants, ``α > 0``).
        x_s1, eps_s1, x_s2, eps_s2: the two reverse samples and the ``ε̂`` there.
        alpha_s, sigma_s: schedule values at ``s``.
        stop_anchor_grad: ``True`` detaches ``x_t`` and ``eps_t`` (the anchor ``h_t``).
        reduction: as in :func:`consistency_loss`.

    Gradients follow from the chain rule through ``h``: e.g. ``∂L/∂ε̂_s⁽¹⁾ =
    −(σ_s/α_s)(h_2 − h_t)/N``. Reverse samples are normally produced without gradient
    (as in the reference code); if ``x_s⁽ⁱ⁾`` depends on ``ε̂_t`` with grad enabled, autograd
    also follows that path whatever ``stop_anchor_grad`` says.
    """
    check_reduction(reduction)
    names = ("x_t", "eps_t", "x_s1", "eps_s1", "x_s2", "eps_s2")
    xs = [x_t, eps_t, x_s1, eps_s1, x_s2, eps_s2]
    check_data(names, xs)
    if not isinstance(stop_anchor_grad, bool):
        raise TypeError(f"stop_anchor_grad must be a bool, got {type(stop_anchor_grad).__name__}")
    if stop_anchor_grad:
        xs[0], xs[1] = xs[0].detach(), xs[1].detach()
    B, dev = x_t.shape[0], x_t.device
    checks = DeferredChecks()
    named = (("alpha_t", alpha_t, "positive"), ("sigma_t", sigma_t, "nonnegative"),
             ("alpha_s", alpha_s, "positive"), ("sigma_s", sigma_s, "nonnegative"))
    scalars = [per_sample_scalar(n, v, B, dev, sign, checks) for n, v, sign in named]
    # u = h_1 − h_t, v = h_2 − h_t with h = (x − σ ε̂)/α per input pair
    coef = coefficient_table(OP_CONSISTENCY, "consistency_eps", scalars, acc_dtype(xs))
    check_finite_table(checks, coef, (("alpha_t", scalars[0]), ("alpha_s", scalars[2])),
                       "the x0-predictions (x − σ ε̂)/α would overflow")
    checks.run()  # one host sync for every data-dependent check
    per_sample = row_bilinear(OP_CONSISTENCY, xs, coef, square=False)
    return _reduce(per_sample, reduction)
