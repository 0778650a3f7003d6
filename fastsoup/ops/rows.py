"""The row engines behind every ambient op (SPEC §3): differentiable row-wise forms.

Every ambient loss is a row-wise bilinear form ``ℓ_i = c_i · mean_j (Σ_k A_ik x_k)(Σ_k
B_ik x_k)`` and the reverse sampler a row-wise linear map ``y_m = Σ_k C_imk x_k``, with
per-sample coefficients read from one ``[B, 16]`` table
(:mod:`fastsoup.ops.ambient_coefficients`). For each form: the PyTorch reference (the CPU
path, the float64 path and the oracle), the fused Triton launchers of
:mod:`fastsoup.kernels.triton.ambient` (inputs read once per pass, fp32 arithmetic, no
``[B, D]`` temporary besides the outputs), and the registration
(:class:`fastsoup.ops._registration.FusedOp`: ``fastsoup::ambient_row_bilinear`` and
``fastsoup::ambient_row_linear``). ``op`` names the public op whose backend policy applies
(``FASTSOUP_BACKEND=op=name``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import _backend
from ..kernels.abi import (COEF_COLS, COL_A, COL_B, COL_SCALE, MAX_BILINEAR_INPUTS,
                           MAX_LINEAR_INPUTS, MAX_LINEAR_OUTPUTS, linear_col)
from ..kernels.layout import launch_rows
from ._registration import FusedOp, chosen_backend, grads_or_none, no_grads


def acc_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 when a tensor is float64 (the checking dtype), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _bcast(c: Tensor, ndim: int) -> Tensor:
    return c.view((c.shape[0],) + (1,) * (ndim - 1))


def _backend_for(op: str, xs: Sequence[Tensor], acc: Optional[torch.dtype] = None) -> str:
    if acc == torch.float64 or any(x.dtype == torch.float64 for x in xs) or xs[0].shape[0] == 0:
        return "reference"  # float64 is the checking dtype: the reference handles it
    return _backend.choose(op, xs[0].device).backend


def _triton():
    from ..kernels.triton import ambient as launchers

    return launchers


# ---------------------------------------------------------------- bilinear: reference
def _row_combination(xs: Sequence[Tensor], coef: Tensor) -> Tensor:
    """``Σ_k coef[:, k] x_k`` in ``coef.dtype`` (one new tensor, accumulated in place)."""
    nd = xs[0].dim()
    out = xs[0].to(coef.dtype) * _bcast(coef[:, 0], nd)
    for k in range(1, len(xs)):
        out.addcmul_(xs[k].to(coef.dtype), _bcast(coef[:, k], nd))
    return out


def reference_bilinear(xs: Sequence[Tensor], coef: Tensor, square: bool) -> Tensor:
    """``ℓ_i = c_i · mean_j u_ij v_ij`` (exactly 0 where ``c_i = 0``), ``[B]``.

    ``u = Σ_k A_ik x_k``, ``v = Σ_k B_ik x_k`` with ``A``, ``B``, ``c`` read from the
    ``[B, 16]`` table ``coef`` (``square``: ``v = u``). Computed in ``coef.dtype``.
    """
    n = len(xs)
    u = _row_combination(xs, coef[:, COL_A:COL_A + n])
    if square:
        u.square_()
    else:
        u.mul_(_row_combination(xs, coef[:, COL_B:COL_B + n]))
    B = xs[0].shape[0]
    raw = u.reshape(B, u.numel() // B if B else 1).mean(dim=1)
    scale = coef[:, COL_SCALE]
    return torch.where(scale == 0, torch.zeros_like(raw), scale * raw)


def reference_bilinear_backward(grad: Tensor, xs: Sequence[Tensor], coef: Tensor,
                                square: bool, needs: Sequence[bool]) -> List[Tensor]:
    """``∂ℓ_i/∂x_k = s_i (A_ik v + B_ik u)`` with ``s_i = g_i c_i / D``.

    Rows with ``s_i = 0`` get exact zeros, even where the inputs hold inf or NaN.
    """
    n = len(xs)
    acc = coef.dtype
    nd = xs[0].dim()
    B = xs[0].shape[0]
    D = xs[0][0].numel() if B else 1
    s = grad.to(acc) * coef[:, COL_SCALE] / D
    dead = _bcast(s == 0, nd)
    u = _row_combination(xs, coef[:, COL_A:COL_A + n]).masked_fill_(dead, 0.0)
    v = None if square else _row_combination(xs, coef[:, COL_B:COL_B + n]).masked_fill_(dead, 0.0)
    out = []
    for k, (x, need) in enumerate(zip(xs, needs)):
        if not need:
            out.append(x.new_empty(0))
        elif square:
            out.append((u * _bcast(2 * s * coef[:, COL_A + k], nd)).to(x.dtype))
        else:
            g = v * _bcast(s * coef[:, COL_A + k], nd)
            g.addcmul_(u, _bcast(s * coef[:, COL_B + k], nd))
            out.append(g.to(x.dtype))
    return out


# ---------------------------------------------------------------- bilinear: registration
def _bilinear_impl(xs: List[Tensor], coef: Tensor, square: bool, backend: str) -> Tensor:
    if backend == "reference":
        return reference_bilinear(xs, coef, square)
    return launch_rows(xs, [], lambda ins, outs, layout: _triton().bilinear_forward(
        ins, coef, square, layout))


def _bilinear_backward_impl(grad: Tensor, xs: List[Tensor], coef: Tensor, square: bool,
                            needs: Sequence[bool], backend: str) -> List[Tensor]:
    if backend == "reference":
        return reference_bilinear_backward(grad, xs, coef, square, needs)
    grad = grad.to(torch.float32).contiguous()
    grads = [torch.empty_like(x) if n else None for x, n in zip(xs, needs)]
    launch_rows(xs, grads, lambda ins, outs, layout: _triton().bilinear_backward(
        ins, coef, grad, outs, square, layout))
    return [g if g is not None else x.new_empty(0) for g, x in zip(grads, xs)]


def _bilinear(op: str, xs: List[Tensor], coef: Tensor, square: bool) -> Tensor:
    return _bilinear_impl(xs, coef, square, _backend_for(op, xs, coef.dtype))


def _bilinear_fake(op, xs, coef, square):
    return xs[0].new_empty((xs[0].shape[0],), dtype=coef.dtype)


def _bilinear_backward(op: str, grad: Tensor, xs: List[Tensor], coef: Tensor, square: bool,
                       needs: List[bool], backend: str = "") -> List[Tensor]:
    backend = chosen_backend(backend, lambda: _backend_for(op, xs, coef.dtype))
    return _bilinear_backward_impl(grad, xs, coef, square, needs, backend)


def _bilinear_backward_fake(op, grad, xs, coef, square, needs, backend=""):
    return [torch.empty_like(x) if n else x.new_empty(0) for x, n in zip(xs, needs)]


def _bilinear_setup(ctx, inputs, output):
    op, xs, coef, square = inputs
    ctx.op, ctx.square = op, square
    ctx.backend = _backend_for(op, xs, coef.dtype)
    ctx.save_for_backward(coef, *xs)


def _bilinear_grad(ctx, needs, grad, run):
    coef, *xs = ctx.saved_tensors
    needs = [bool(n) for n in needs[1]]
    if no_grads(needs):
        return None, None, None, None
    gs = run(ctx.op, grad, xs, coef, ctx.square, needs, ctx.backend)
    return None, grads_or_none(gs, needs), None, None


BILINEAR = FusedOp("ambient_row_bilinear", _bilinear, _bilinear_fake, setup=_bilinear_setup,
                   grad=_bilinear_grad, backward=_bilinear_backward,
                   fake_backward=_bilinear_backward_fake)


def row_bilinear(op: str, xs: Sequence[Tensor], coef: Tensor, square: bool) -> Tensor:
    """Differentiable ``[B]`` row bilinear form (see :func:`reference_bilinear`).

    ``op`` names the public op for backend selection; ``coef`` is a ``[B, 16]`` table that
    does not require grad. Inputs are validated by the public wrappers.
    """
    assert 1 <= len(xs) <= MAX_BILINEAR_INPUTS
    assert coef.shape == (xs[0].shape[0], COEF_COLS) and not coef.requires_grad
    return BILINEAR(op, list(xs), coef, square)


# ---------------------------------------------------------------- row-linear map
def reference_linear(xs: Sequence[Tensor], coef: Tensor, n_out: int,
                     dtype: torch.dtype) -> List[Tensor]:
    """``y_m = Σ_k C_imk x_k`` (``C_mk`` at :func:`fastsoup.kernels.abi.linear_col`),
    computed in ``coef.dtype``."""
    n = len(xs)
    outs = []
    for m in range(n_out):
        out = torch.empty_like(xs[0], dtype=dtype)  # laid out like xs[0], as the kernels do
        out.copy_(_row_combination(xs, coef[:, linear_col(m, 0):linear_col(m, n)]))
        outs.append(out)
    return outs


def _linear_impl(xs: List[Tensor], coef: Tensor, n_out: int, dtype: torch.dtype,
                 backend: str) -> List[Tensor]:
    if backend == "reference":
        return reference_linear(xs, coef, n_out, dtype)
    outs = [torch.empty_like(xs[0], dtype=dtype) for _ in range(n_out)]
    launch_rows(xs, outs, lambda ins, o, layout: _triton().linear_forward(ins, coef, o, layout))
    return outs


def _linear(op: str, xs: List[Tensor], coef: Tensor, n_out: int, dtype: torch.dtype,
            backend: str = "") -> List[Tensor]:
    # backend: "" chooses now; the backward passes the forward's choice explicitly
    backend = chosen_backend(backend, lambda: _backend_for(op, xs, coef.dtype))
    return _linear_impl(xs, coef, n_out, dtype, backend)


def _linear_fake(op, xs, coef, n_out, dtype, backend=""):
    return [torch.empty_like(xs[0], dtype=dtype) for _ in range(n_out)]


def _linear_transposed(coef: Tensor, grads, dtypes, needs, run) -> List[Optional[Tensor]]:
    """``∂/∂x_k = Σ_m C_imk g_m``: the same map on the output gradients with ``C``
    transposed, once per distinct input dtype (usually one). ``run(gs, table, n, dtype)``
    applies the map."""
    live = [m for m, g in enumerate(grads) if g is not None]
    result: List[Optional[Tensor]] = [None] * len(needs)
    if not live or not any(needs):
        return result
    B = coef.shape[0]
    C = coef.view(B, 4, 4)[:, live, :]                   # [B, M_live, 4 (k)]
    gs = [grads[m] for m in live]
    for dtype in dict.fromkeys(d for d, n in zip(dtypes, needs) if n):
        ks = [k for k, (d, n) in enumerate(zip(dtypes, needs)) if n and d == dtype]
        T = coef.new_zeros((B, 4, 4))
        T[:, :len(ks), :len(live)] = C[:, :, ks].transpose(1, 2)
        outs = run(gs, T.view(B, COEF_COLS), len(ks), dtype)
        for k, o in zip(ks, outs):
            result[k] = o
    return result


def _linear_setup(ctx, inputs, output):
    op, xs, coef, n_out, dtype = inputs[:5]
    backend = inputs[5] if len(inputs) > 5 else ""
    ctx.op = op
    ctx.backend = chosen_backend(backend, lambda: _backend_for(op, xs, coef.dtype))
    ctx.dtypes = [x.dtype for x in xs]
    ctx.save_for_backward(coef)


def _linear_grad(ctx, needs, grads, run):
    (coef,) = ctx.saved_tensors
    grads = list(grads) if isinstance(grads, (list, tuple)) else [grads]
    result = _linear_transposed(
        coef, grads, ctx.dtypes, [bool(n) for n in needs[1]],
        lambda gs, T, n, dtype: run(ctx.op, gs, T, n, dtype, ctx.backend))
    return (None, result) + (None,) * (len(needs) - 2)


LINEAR = FusedOp("ambient_row_linear", _linear, _linear_fake, setup=_linear_setup,
                 grad=_linear_grad)


def row_linear(op: str, xs: Sequence[Tensor], coef: Tensor, n_out: int,
               dtype: torch.dtype) -> List[Tensor]:
    """Differentiable row-linear map ``y_m = Σ_k C_imk x_k`` (``coef``: ``[B, 16]`` table)."""
    assert 1 <= len(xs) <= MAX_LINEAR_INPUTS and 1 <= n_out <= MAX_LINEAR_OUTPUTS
    assert coef.shape == (xs[0].shape[0], COEF_COLS) and not coef.requires_grad
    return LINEAR(op, list(xs), coef, n_out, dtype)
