"""One VP reverse (DDPM ancestral) step, fused (SPEC §3): the reverse samples of the
consistency loss.

``x_s = α_s ĥ + c_o ε̂ + c_f ξ`` (:func:`vp_reverse_step`), or with ``ĥ = (x_t − σ_t ε̂)/α_t``
folded into the kernel (:func:`vp_reverse_step_from_eps`); two noise draws give the two
consistency samples in one pass. One row-linear map (:func:`fastsoup.ops.rows.row_linear`)
with coefficients from :mod:`fastsoup.ops.ambient_coefficients`; the step's scalars come
from :func:`fastsoup.ops.schedule.vp_reverse_step_coefficients`.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend
from ._checks import DeferredChecks, Scalar, check_data, check_float_tensor, per_sample_scalar
from .ambient_coefficients import check_finite_table, coefficient_table
from .rows import acc_dtype, row_linear

OP_STEP = "vp_reverse_step"
_backend.register_op(OP_STEP, ("reference", "triton"), default_gpu="triton")


def _noise_list(noise) -> Tuple[List[Tensor], bool]:
    if isinstance(noise, Tensor):
        return [noise], True
    if isinstance(noise, (list, tuple)) and noise and all(isinstance(n, Tensor) for n in noise):
        if len(noise) > 2:
            raise ValueError(f"at most 2 noise tensors per call, got {len(noise)}")
        return list(noise), False
    raise TypeError("noise must be a tensor or a list/tuple of 1-2 tensors")


# Each step scalar and the sign it must have (finite in every case).
SIGNS = {"alpha_t": "positive", "sigma_t": "nonnegative", "alpha_s": "positive",
         "c_o": "nonnegative", "c_f": "nonnegative"}


def _reverse_step(names, base: List[Tensor], noise, kind: str, scalars: Sequence[Tuple[str, Scalar]]):
    noises, single = _noise_list(noise)
    noise_names = ["noise"] if single else [f"noise[{i}]" for i in range(len(noises))]
    check_data(list(names) + noise_names, base + noises)
    B, dev = base[0].shape[0], base[0].device
    checks = DeferredChecks()
    values = [per_sample_scalar(n, v, B, dev, SIGNS[n], checks) for n, v in scalars]
    xs = base + noises
    out_dtype = xs[0].dtype
    for x in xs[1:]:
        out_dtype = torch.promote_types(out_dtype, x.dtype)
    coef = coefficient_table(OP_STEP, kind, values, acc_dtype(xs), n_out=len(noises))
    check_finite_table(checks, coef, tuple((n, v) for (n, _), v in zip(scalars, values)),
                       "the step's coefficients would overflow")
    checks.run()  # one host sync for every data-dependent check
    outs = row_linear(OP_STEP, xs, coef, len(noises), out_dtype)
    return outs[0] if single else tuple(outs)


def vp_reverse_step(x0_pred: Tensor, eps_pred: Tensor, noise, alpha_s: Scalar, c_o: Scalar,
                    c_f: Scalar):
    """One VP ancestral step ``x_s = α_s ĥ + c_o ε̂ + c_f ξ``, fused (SPEC §3).

    Args:
        x0_pred: ``ĥ_t``, ``[B, ...]`` float tensor. eps_pred: ``ε̂_t``, same shape.
        noise: ``ξ`` (same shape), or a list/tuple of two such tensors: the two
            consistency samples are then written in one pass that reads ``ĥ`` and ``ε̂``
            once.
        alpha_s, c_o, c_f: ``[B]`` (or numbers), e.g. from :func:`vp_reverse_step_coefficients`.

    Returns:
        ``x_s`` (or a tuple of them) in the promoted dtype of the inputs, laid out like
        ``x0_pred``; differentiable with respect to every tensor input.
    """
    check_float_tensor("x0_pred", x0_pred)
    return _reverse_step(("x0_pred", "eps_pred"), [x0_pred, eps_pred], noise, "step",
                         (("alpha_s", alpha_s), ("c_o", c_o), ("c_f", c_f)))


def vp_reverse_step_from_eps(x_t: Tensor, eps_pred: Tensor, noise, alpha_t: Scalar,
                             sigma_t: Scalar, alpha_s: Scalar, c_o: Scalar, c_f: Scalar):
    """:func:`vp_reverse_step` with ``ĥ = (x_t − σ_t ε̂)/α_t`` folded into the kernel.

    ``x_s = (α_s/α_t) x_t + (c_o − α_s σ_t/α_t) ε̂ + c_f ξ``: the x0-prediction is never
    materialised. Arguments as in :func:`vp_reverse_step` plus ``α_t``, ``σ_t`` (``[B]``).
    """
    check_float_tensor("x_t", x_t)
    return _reverse_step(("x_t", "eps_pred"), [x_t, eps_pred], noise, "step_eps", (
        ("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_s", alpha_s), ("c_o", c_o), ("c_f", c_f)))
