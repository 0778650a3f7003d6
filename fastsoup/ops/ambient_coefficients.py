"""Per-sample coefficient tables of the ambient ops (SPEC §3).

Every ambient op is driven by one ``[B, 16]`` table of per-sample coefficients computed
from the schedule scalars in float64 (layout: :mod:`fastsoup.kernels.abi`): the formulas
below as PyTorch (the reference, the CPU path and the oracle) or one Triton launch, behind
the custom op ``fastsoup::ambient_coefficients`` (not differentiable: the scalars are
constants of the schedule).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend
from ._checks import is_vouched
from ..kernels.abi import COEF_COLS, COEF_KINDS, COL_SCALE, COL_VALID, linear_col

KINDS = COEF_KINDS


def vp_loss_coefficients(alpha_t: Tensor, sigma_t: Tensor, alpha_n: Tensor, sigma_n: Tensor,
                         mode: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-sample ``(a, b, k, c, valid, live)`` of the VP ambient loss (``[B]``).

    ``a = α_t/α_n``, ``b = sqrt(max(σ_t² − a²σ_n², 0))``, ``valid = σ_t ≥ σ_n`` (counted
    by the mean), ``live = valid ∧ b > 0``; ``k = b/σ_t`` and ``c = (b/a)²`` (x0-mode) or
    ``1`` (ε-mode) where live, 0 elsewhere (so no 0/0 is ever formed).
    """
    valid = sigma_t >= sigma_n
    a = alpha_t / alpha_n
    asn = a * sigma_n  # σ_t² − a²σ_n² as a product: exactly 0 at t = t_n (as the kernel)
    b = torch.sqrt(torch.clamp((sigma_t - asn) * (sigma_t + asn), min=0.0))
    live = valid & (b > 0)
    zero = torch.zeros_like(b)
    k = torch.where(live, b / torch.where(live, sigma_t, torch.ones_like(sigma_t)), zero)
    c = torch.where(live, (b / a) ** 2 if mode == "x0" else torch.ones_like(b), zero)
    return a, b, k, c, valid, live


def ve_loss_coefficients(sigma_t: Tensor, sigma_n: Tensor, sigma_data: float
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample ``(p, q, λ, valid)`` of the VE ambient loss (``[B]``).

    Pseudo-target ``y = p x_n + q x_t`` with ``p = σ_t²/(σ_t² − σ_n²)``,
    ``q = −σ_n²/(σ_t² − σ_n²)``; ``λ = (σ_t² + σ_d²)/(σ_t σ_d)²``; ``valid = σ_t > σ_n``
    (``p``, ``q``, ``λ`` are 0 where invalid, so nothing divides by zero).
    """
    valid = sigma_t > sigma_n
    one = torch.ones_like(sigma_t)
    zero = torch.zeros_like(sigma_t)
    st2, sn2 = sigma_t * sigma_t, sigma_n * sigma_n
    den = torch.where(valid, st2 - sn2, one)
    p = torch.where(valid, st2 / den, zero)
    q = torch.where(valid, -sn2 / den, zero)
    sd2 = float(sigma_data) ** 2
    lam = torch.where(valid, (st2 + sd2) / (torch.where(valid, st2, one) * sd2), zero)
    return p, q, lam, valid


def reference_coefficients(kind: str, scalars: Sequence[Tensor], param: float, n_out: int,
                           dtype: torch.dtype) -> Tensor:
    """The ``[B, 16]`` coefficient table of ``kind`` (float64 arithmetic, then ``dtype``)."""
    p = [x.to(torch.float64) for x in scalars]
    B = p[0].shape[0]
    T = torch.zeros((B, COEF_COLS), dtype=torch.float64, device=p[0].device)
    if kind in ("vp_x0", "vp_eps"):
        _, _, k, c, valid, live = vp_loss_coefficients(*p, mode=kind[3:])
        for col, v in ((0, -k), (1, live), (6, -k), (7, live), (COL_SCALE, c), (COL_VALID, valid)):
            T[:, col] = v
    elif kind == "ve":
        pp, q, lam, valid = ve_loss_coefficients(p[0], p[1], param)
        for col, v in ((0, valid), (1, -pp), (2, -q), (6, valid), (7, -pp), (8, -q),
                       (COL_SCALE, lam), (COL_VALID, valid)):
            T[:, col] = v
    elif kind == "consistency_eps":  # u = h_1 − h_t, v = h_2 − h_t, h = (x − σ ε̂)/α
        at, st, as_, ss = p
        for col, v in ((0, -1 / at), (1, st / at), (2, 1 / as_), (3, -ss / as_),
                       (6, -1 / at), (7, st / at), (10, 1 / as_), (11, -ss / as_),
                       (COL_SCALE, 1.0), (COL_VALID, 1.0)):
            T[:, col] = v
    elif kind in ("step", "step_eps"):
        if kind == "step":  # inputs (ĥ, ε̂, ξ_1[, ξ_2])
            cx, ce, cf = p
        else:               # inputs (x_t, ε̂, ξ_1[, ξ_2]), ĥ = (x_t − σ_t ε̂)/α_t
            at, st, as_, co, cf = p
            cx, ce = as_ / at, co - as_ * st / at
        for m in range(n_out):
            T[:, linear_col(m, 0)], T[:, linear_col(m, 1)], T[:, linear_col(m, 2 + m)] = cx, ce, cf
    else:
        raise ValueError(f"unknown coefficient kind {kind!r}")
    return T.to(dtype)


def _coefficients_impl(op: str, kind: str, scalars: List[Tensor], param: float, n_out: int,
                       dtype: torch.dtype) -> Tensor:
    # float64 scalars are fine for the kernel (it computes in float64); the table's dtype
    # (float64 only for float64 data) decides whether the reference runs.
    if dtype == torch.float64 or scalars[0].shape[0] == 0 or \
            _backend.choose(op, scalars[0].device).backend == "reference":
        return reference_coefficients(kind, scalars, param, n_out, dtype)
    from ..kernels.triton import ambient as tamb

    return tamb.coefficients(KINDS.index(kind), [x.contiguous() for x in scalars],
                             scalars[0].shape[0], param, n_out)


@torch.library.custom_op("fastsoup::ambient_coefficients", mutates_args=())
def _coefficients_op(op: str, kind: str, scalars: List[Tensor], param: float, n_out: int,
                     dtype: torch.dtype) -> Tensor:
    return _coefficients_impl(op, kind, scalars, param, n_out, dtype)


@_coefficients_op.register_fake
def _(op, kind, scalars, param, n_out, dtype):
    return scalars[0].new_empty((scalars[0].shape[0], COEF_COLS), dtype=dtype)


def coefficient_table(op: str, kind: str, scalars: Sequence[Tensor], dtype: torch.dtype,
                      param: float = 0.0, n_out: int = 1) -> Tensor:
    """``[B, 16]`` table of ``kind`` from ``[B]`` schedule scalars (one launch when fused)."""
    assert kind in KINDS and not any(x.requires_grad for x in scalars)
    if torch.compiler.is_compiling():
        return _coefficients_op(op, kind, list(scalars), float(param), n_out, dtype)
    return _coefficients_impl(op, kind, list(scalars), float(param), n_out, dtype)


_CONSTANT_TABLES: dict = {}


def consistency_table(batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The constant table of the h-form consistency loss (``u = h_1 − h_t``,
    ``v = h_2 − h_t`` over inputs ``(h_t, h_1, h_2)``), expanded to ``[B, 16]``."""
    values = [0.0] * COEF_COLS
    values[0], values[1], values[6], values[8] = -1.0, 1.0, -1.0, 1.0
    values[COL_SCALE] = values[COL_VALID] = 1.0
    if torch.compiler.is_compiling():  # traced: a graph constant, never a cached tensor
        return torch.tensor(values, dtype=dtype, device=device).expand(batch, COEF_COLS)
    key = (device, dtype)
    row = _CONSTANT_TABLES.get(key)
    if row is None:  # eager: made once per device and dtype (no copy to the device per call)
        row = _CONSTANT_TABLES[key] = torch.tensor(values, dtype=dtype, device=device)
    return row.expand(batch, COEF_COLS)


def check_finite_table(checks, coef: Tensor, scalars: Sequence[Tuple[str, Tensor]], why: str) -> None:
    """Finite valid scalars must give a finite table: a coefficient that overflows the
    table's dtype (a tiny σ_t or α_t) raises, naming ``scalars[0]`` and showing the bad
    samples' values, instead of a NaN/inf result. Added to the caller's deferred checks
    (one host transfer for all of them)."""
    def error():
        bad = ~torch.isfinite(coef).all(dim=1)
        idx = bad.nonzero().flatten()[:4].tolist()
        shown = ", ".join(f"{name} = " + ", ".join(f"{values[i].item():g}" for i in idx)
                          for name, values in scalars)
        where = f"sample{'s' if len(idx) > 1 else ''} {', '.join(map(str, idx))}"
        return ValueError(f"{scalars[0][0]} is too small for {coef.dtype} at {where} ({shown}): {why}")

    if all(is_vouched(values) for _, values in scalars):
        return  # valid schedule scalars cannot overflow the table (see ops.schedule)
    checks.add(~torch.isfinite(coef).all(), error)
