"""Row-wise linear forms for the ambient-diffusion ops (SPEC §3): kernels and launchers.

Every ambient op reduces to one of two shapes of computation over ``K`` same-shaped
``[B, ...]`` inputs ``x_k`` with per-sample fp32 coefficients:

* **bilinear reduction** (the losses): ``ℓ_i = mean_j u_ij · v_ij`` with
  ``u = Σ_k A_ik x_k`` and ``v = Σ_k B_ik x_k`` (``K ≤ 6``). ``SQUARE`` (``v = u``) gives
  the squared residuals of the double-Tweedie losses; the consistency loss is the general
  case. The backward kernel writes ``∂ℓ_i/∂x_k = s_i (A_ik v + B_ik u)`` with
  ``s_i = g_i c_i / D`` directly into the gradients; a row with ``s_i = 0`` gets exact
  zeros.
* **row-linear map** (the reverse sampler and its backward): ``y_m = Σ_k C_imk x_k`` for
  ``K ≤ 4`` inputs and ``M ≤ 4`` outputs, e.g. two reverse samples sharing ``ĥ`` and ``ε̂``.

Per-sample coefficients live in one ``[B, 16]`` table (any row stride, 0 for a table
shared by every sample): bilinear ``A`` at 0–5, ``B`` at 6–11, the row scale ``c_i`` at 12
(``ℓ_i = c_i · mean_j u v``; ``c_i = 0`` gives an exact 0 and zero gradients), the validity
flag at 13; row-linear ``C_mk`` at ``4m + k``. :func:`coefficients` fills the table from
the raw schedule scalars in one launch (float64 arithmetic), so an op costs a handful of
launches in total, not one per ``[B]``-sized formula.

Kernels walk a :class:`fastsoup.kernels.layout.RowLayout` (program ``(row, chunk)`` handles
``CHUNK`` consecutive elements of one sample), offsets are int64, arithmetic is fp32
whatever the storage dtypes, and no ``[B, D]`` temporary is allocated: inputs are read
once per pass, the per-sample reduction goes through fp32 ``[B, n_chunks]`` partial sums
that are added in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..abi import (COEF_COLS, COEF_KINDS, COL_SCALE, COL_VALID, MAX_BILINEAR_INPUTS,
                   MAX_LINEAR_INPUTS, MAX_LINEAR_OUTPUTS)
from ..layout import RowLayout, on_device_of, row_chunks
from .rows import load_f32 as _ld
from .rows import row_offsets as _offs

BLOCK = 1024
NUM_WARPS = 4
# FMA contraction. Row kernels: on (fp32 sums of products; fused is at least as exact).
# Coefficient kernel: off, so that the float64 formulas round exactly as the reference and
# the interpreter do; the one expression that cancels (σ_t² − a²σ_n²) is also written in
# a form that stays exact when fused. Set on every launch (the default may change).
FP_FUSION_ROWS = True
FP_FUSION_COEFFICIENTS = False
BLOCK_B = 128  # samples per program of the coefficient kernel
# The table layout (kernels/abi.py) as kernel constants.
_COLS = tl.constexpr(COEF_COLS)
_SCALE = tl.constexpr(COL_SCALE)
_VALID = tl.constexpr(COL_VALID)


@triton.jit
def _bilinear_uv(
    row, j, mask,
    x0, x1, x2, x3, x4, x5,
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3, b4, b5,
    sb0, s10, s20, s30, sb1, s11, s21, s31, sb2, s12, s22, s32,
    sb3, s13, s23, s33, sb4, s14, s24, s34, sb5, s15, s25, s35,
    S2, S3,
    N_IN: tl.constexpr, SQUARE: tl.constexpr, DENSE: tl.constexpr,
):
    """u = Σ_k a_k x_k and v = Σ_k b_k x_k (v = u when SQUARE) for one block, in fp32."""
    x = _ld(x0, row, sb0, s10, s20, s30, j, mask, S2, S3, DENSE)
    u = a0 * x
    v = b0 * x
    if N_IN > 1:
        x = _ld(x1, row, sb1, s11, s21, s31, j, mask, S2, S3, DENSE)
        u += a1 * x
        v += b1 * x
    if N_IN > 2:
        x = _ld(x2, row, sb2, s12, s22, s32, j, mask, S2, S3, DENSE)
        u += a2 * x
        v += b2 * x
    if N_IN > 3:
        x = _ld(x3, row, sb3, s13, s23, s33, j, mask, S2, S3, DENSE)
        u += a3 * x
        v += b3 * x
    if N_IN > 4:
        x = _ld(x4, row, sb4, s14, s24, s34, j, mask, S2, S3, DENSE)
        u += a4 * x
        v += b4 * x
    if N_IN > 5:
        x = _ld(x5, row, sb5, s15, s25, s35, j, mask, S2, S3, DENSE)
        u += a5 * x
        v += b5 * x
    if SQUARE:
        v = u
    return u, v


@triton.jit
def _bilinear_partial_kernel(
    x0, x1, x2, x3, x4, x5, coef_ptr, partial_ptr,
    sb0, s10, s20, s30, sb1, s11, s21, s31, sb2, s12, s22, s32,
    sb3, s13, s23, s33, sb4, s14, s24, s34, sb5, s15, s25, s35,
    c_sb, D, S2, S3, CHUNK, n_chunks, inv_D,
    N_IN: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr, DENSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    start = chunk * CHUNK
    cb = coef_ptr + row * c_sb  # the table has 16 columns: every load below is in bounds
    a0 = tl.load(cb + 0)
    a1 = tl.load(cb + 1)
    a2 = tl.load(cb + 2)
    a3 = tl.load(cb + 3)
    a4 = tl.load(cb + 4)
    a5 = tl.load(cb + 5)
    b0 = tl.load(cb + 6)
    b1 = tl.load(cb + 7)
    b2 = tl.load(cb + 8)
    b3 = tl.load(cb + 9)
    b4 = tl.load(cb + 10)
    b5 = tl.load(cb + 11)
    scale = tl.load(cb + _SCALE)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        j = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < D
        u, v = _bilinear_uv(
            row, j, mask, x0, x1, x2, x3, x4, x5,
            a0, a1, a2, a3, a4, a5, b0, b1, b2, b3, b4, b5,
            sb0, s10, s20, s30, sb1, s11, s21, s31, sb2, s12, s22, s32,
            sb3, s13, s23, s33, sb4, s14, s24, s34, sb5, s15, s25, s35,
            S2, S3, N_IN, SQUARE, DENSE,
        )
        acc += u * v
    total = tl.sum(acc, axis=0) * inv_D
    # scale == 0 (a masked sample) stores an exact 0 even if the row holds inf/NaN
    tl.store(partial_ptr + row * n_chunks + chunk, tl.where(scale == 0.0, 0.0, scale * total))


@triton.jit
def _store_grad(gptr, row, gsb, gs1, gs2, gs3, j, mask, S2, S3, s, a, b, u, v,
                DENSE: tl.constexpr):
    # s == 0 (a masked or excluded sample) writes exact zeros even if the row holds inf/NaN.
    g = tl.where(s == 0.0, 0.0, s * (a * v + b * u))
    tl.store(gptr + _offs(row, gsb, gs1, gs2, gs3, j, S2, S3, DENSE),
             g.to(gptr.dtype.element_ty), mask=mask)


@triton.jit
def _bilinear_grad_kernel(
    x0, x1, x2, x3, x4, x5, coef_ptr, grad_ptr,
    g0, g1, g2, g3, g4, g5,
    sb0, s10, s20, s30, sb1, s11, s21, s31, sb2, s12, s22, s32,
    sb3, s13, s23, s33, sb4, s14, s24, s34, sb5, s15, s25, s35,
    gsb0, gs10, gs20, gs30, gsb1, gs11, gs21, gs31, gsb2, gs12, gs22, gs32,
    gsb3, gs13, gs23, gs33, gsb4, gs14, gs24, gs34, gsb5, gs15, gs25, gs35,
    c_sb, D, S2, S3, CHUNK, inv_D,
    N_IN: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr, DENSE: tl.constexpr,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    W3: tl.constexpr, W4: tl.constexpr, W5: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    start = chunk * CHUNK
    cb = coef_ptr + row * c_sb
    a0 = tl.load(cb + 0)
    a1 = tl.load(cb + 1)
    a2 = tl.load(cb + 2)
    a3 = tl.load(cb + 3)
    a4 = tl.load(cb + 4)
    a5 = tl.load(cb + 5)
    b0 = tl.load(cb + 6)
    b1 = tl.load(cb + 7)
    b2 = tl.load(cb + 8)
    b3 = tl.load(cb + 9)
    b4 = tl.load(cb + 10)
    b5 = tl.load(cb + 11)
    s = tl.load(grad_ptr + row).to(tl.float32) * tl.load(cb + _SCALE) * inv_D  # g_i c_i / D
    for off in range(0, CHUNK, BLOCK):
        j = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < D
        u, v = _bilinear_uv(
            row, j, mask, x0, x1, x2, x3, x4, x5,
            a0, a1, a2, a3, a4, a5, b0, b1, b2, b3, b4, b5,
            sb0, s10, s20, s30, sb1, s11, s21, s31, sb2, s12, s22, s32,
            sb3, s13, s23, s33, sb4, s14, s24, s34, sb5, s15, s25, s35,
            S2, S3, N_IN, SQUARE, DENSE,
        )
        if W0:
            _store_grad(g0, row, gsb0, gs10, gs20, gs30, j, mask, S2, S3, s,
                        a0, b0, u, v, DENSE)
        if W1:
            _store_grad(g1, row, gsb1, gs11, gs21, gs31, j, mask, S2, S3, s,
                        a1, b1, u, v, DENSE)
        if W2:
            _store_grad(g2, row, gsb2, gs12, gs22, gs32, j, mask, S2, S3, s,
                        a2, b2, u, v, DENSE)
        if W3:
            _store_grad(g3, row, gsb3, gs13, gs23, gs33, j, mask, S2, S3, s,
                        a3, b3, u, v, DENSE)
        if W4:
            _store_grad(g4, row, gsb4, gs14, gs24, gs34, j, mask, S2, S3, s,
                        a4, b4, u, v, DENSE)
        if W5:
            _store_grad(g5, row, gsb5, gs15, gs25, gs35, j, mask, S2, S3, s,
                        a5, b5, u, v, DENSE)


@triton.jit
def _linear_out(x0v, x1v, x2v, x3v, c0, c1, c2, c3, N_IN: tl.constexpr):
    y = c0 * x0v
    if N_IN > 1:
        y += c1 * x1v
    if N_IN > 2:
        y += c2 * x2v
    if N_IN > 3:
        y += c3 * x3v
    return y


@triton.jit
def _linear_kernel(
    x0, x1, x2, x3, y0, y1, y2, y3, coef_ptr,
    sb0, s10, s20, s30, sb1, s11, s21, s31, sb2, s12, s22, s32, sb3, s13, s23, s33,
    tb0, t10, t20, t30, tb1, t11, t21, t31, tb2, t12, t22, t32, tb3, t13, t23, t33,
    c_sb, D, S2, S3, CHUNK,
    N_IN: tl.constexpr, N_OUT: tl.constexpr, BLOCK: tl.constexpr, DENSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    start = chunk * CHUNK
    cb = coef_ptr + row * c_sb  # C_mk at 4m + k; all 16 loads are in bounds
    c00 = tl.load(cb + 0)
    c01 = tl.load(cb + 1)
    c02 = tl.load(cb + 2)
    c03 = tl.load(cb + 3)
    c10 = tl.load(cb + 4)
    c11 = tl.load(cb + 5)
    c12 = tl.load(cb + 6)
    c13 = tl.load(cb + 7)
    c20 = tl.load(cb + 8)
    c21 = tl.load(cb + 9)
    c22 = tl.load(cb + 10)
    c23 = tl.load(cb + 11)
    c30 = tl.load(cb + 12)
    c31 = tl.load(cb + 13)
    c32 = tl.load(cb + 14)
    c33 = tl.load(cb + 15)
    for off in range(0, CHUNK, BLOCK):
        j = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < D
        x0v = _ld(x0, row, sb0, s10, s20, s30, j, mask, S2, S3, DENSE)
        x1v = x0v
        x2v = x0v
        x3v = x0v
        if N_IN > 1:
            x1v = _ld(x1, row, sb1, s11, s21, s31, j, mask, S2, S3, DENSE)
        if N_IN > 2:
            x2v = _ld(x2, row, sb2, s12, s22, s32, j, mask, S2, S3, DENSE)
        if N_IN > 3:
            x3v = _ld(x3, row, sb3, s13, s23, s33, j, mask, S2, S3, DENSE)
        y = _linear_out(x0v, x1v, x2v, x3v, c00, c01, c02, c03, N_IN)
        tl.store(y0 + _offs(row, tb0, t10, t20, t30, j, S2, S3, DENSE),
                 y.to(y0.dtype.element_ty), mask=mask)
        if N_OUT > 1:
            y = _linear_out(x0v, x1v, x2v, x3v, c10, c11, c12, c13, N_IN)
            tl.store(y1 + _offs(row, tb1, t11, t21, t31, j, S2, S3, DENSE),
                     y.to(y1.dtype.element_ty), mask=mask)
        if N_OUT > 2:
            y = _linear_out(x0v, x1v, x2v, x3v, c20, c21, c22, c23, N_IN)
            tl.store(y2 + _offs(row, tb2, t12, t22, t32, j, S2, S3, DENSE),
                     y.to(y2.dtype.element_ty), mask=mask)
        if N_OUT > 3:
            y = _linear_out(x0v, x1v, x2v, x3v, c30, c31, c32, c33, N_IN)
            tl.store(y3 + _offs(row, tb3, t13, t23, t33, j, S2, S3, DENSE),
                     y.to(y3.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------- coefficient table
KIND_VE = COEF_KINDS.index("ve")


@triton.jit
def _ld64(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=1.0).to(tl.float64)


@triton.jit
def _st(ptr, col, val, mask):
    tl.store(ptr + col, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coefficient_kernel(
    out_ptr, p0, p1, p2, p3, p4, B, param,
    KIND: tl.constexpr, N_OUT: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Fill the zeroed [B, 16] coefficient table of one op from its schedule scalars.

    Arithmetic in float64 (``b = sqrt(σ_t² − a²σ_n²)`` cancels near ``t_n``), stored fp32.
    Formulas: see the reference in :mod:`fastsoup.ops.ambient`.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = offs < B
    row = out_ptr + offs.to(tl.int64) * _COLS
    zero = tl.zeros([BLOCK_B], dtype=tl.float64)
    one = zero + 1.0  # columns not written below stay 0 (the table is zero-initialised)
    if KIND <= 1:  # VP: p = (α_t, σ_t, α_n, σ_n)
        at = _ld64(p0, offs, mask)
        st = _ld64(p1, offs, mask)
        an = _ld64(p2, offs, mask)
        sn = _ld64(p3, offs, mask)
        valid = st >= sn
        a = at / an
        # σ_t² − a²σ_n² as a product: exact 0 at t = t_n (a = 1, σ_t = σ_n) even when
        # contracted into an FMA, where st*st - (a*sn)*(a*sn) leaves a rounding residual.
        asn = a * sn
        b = tl.sqrt(tl.maximum((st - asn) * (st + asn), 0.0))
        live = valid & (b > 0.0)
        k = tl.where(live, b / tl.where(live, st, one), zero)
        if KIND == 0:
            c = tl.where(live, (b / a) * (b / a), zero)
        else:
            c = tl.where(live, one, zero)
        lv = tl.where(live, one, zero)
        _st(row, 0, -k, mask)
        _st(row, 1, lv, mask)
        _st(row, 6, -k, mask)
        _st(row, 7, lv, mask)
        _st(row, _SCALE, c, mask)
        _st(row, _VALID, tl.where(valid, one, zero), mask)
    if KIND == 2:  # VE: p = (σ_t, σ_n), param = σ_data² (a float32 kernel argument)
        st = _ld64(p0, offs, mask)
        sn = _ld64(p1, offs, mask)
        valid = st > sn
        st2 = st * st
        sn2 = sn * sn
        den = tl.where(valid, st2 - sn2, one)
        sd2 = zero + param
        lv = tl.where(valid, one, zero)
        p = tl.where(valid, st2 / den, zero)
        q = tl.where(valid, -sn2 / den, zero)
        lam = tl.where(valid, (st2 + sd2) / (tl.where(valid, st2, one) * sd2), zero)
        _st(row, 0, lv, mask)
        _st(row, 1, -p, mask)
        _st(row, 2, -q, mask)
        _st(row, 6, lv, mask)
        _st(row, 7, -p, mask)
        _st(row, 8, -q, mask)
        _st(row, _SCALE, lam, mask)
        _st(row, _VALID, lv, mask)
    if KIND == 3:  # consistency, ε form: p = (α_t, σ_t, α_s, σ_s)
        at = _ld64(p0, offs, mask)
        st = _ld64(p1, offs, mask)
        as_ = _ld64(p2, offs, mask)
        ss = _ld64(p3, offs, mask)
        _st(row, 0, -1.0 / at, mask)
        _st(row, 1, st / at, mask)
        _st(row, 2, 1.0 / as_, mask)
        _st(row, 3, -ss / as_, mask)
        _st(row, 6, -1.0 / at, mask)
        _st(row, 7, st / at, mask)
        _st(row, 10, 1.0 / as_, mask)
        _st(row, 11, -ss / as_, mask)
        _st(row, _SCALE, one, mask)
        _st(row, _VALID, one, mask)
    if KIND >= 4:  # reverse step
        if KIND == 4:  # p = (α_s, c_o, c_f): inputs (ĥ, ε̂, ξ...)
            cx = _ld64(p0, offs, mask)
            ce = _ld64(p1, offs, mask)
            cf = _ld64(p2, offs, mask)
        else:  # p = (α_t, σ_t, α_s, c_o, c_f): inputs (x_t, ε̂, ξ...)
            at = _ld64(p0, offs, mask)
            st = _ld64(p1, offs, mask)
            as_ = _ld64(p2, offs, mask)
            cx = as_ / at
            ce = _ld64(p3, offs, mask) - as_ * st / at
            cf = _ld64(p4, offs, mask)
        _st(row, 0, cx, mask)
        _st(row, 1, ce, mask)
        _st(row, 2, cf, mask)
        if N_OUT > 1:
            _st(row, 4, cx, mask)
            _st(row, 5, ce, mask)
            _st(row, 7, cf, mask)


@on_device_of(lambda kind, scalars, *a: scalars[0])
def coefficients(kind: int, scalars: Sequence[torch.Tensor], batch: int, param: float = 0.0,
                 n_out: int = 1) -> torch.Tensor:
    """fp32 ``[B, 16]`` coefficient table of ``kind`` from ``[B]`` float scalars (any dtype)."""
    out = torch.zeros((batch, COEF_COLS), dtype=torch.float32, device=scalars[0].device)
    ptrs = _pad(scalars, 5, scalars[0])
    param = float(param) ** 2 if kind == KIND_VE else float(param)
    _coefficient_kernel[(triton.cdiv(batch, BLOCK_B),)](
        out, *ptrs, batch, param, KIND=kind, N_OUT=n_out, BLOCK_B=BLOCK_B, num_warps=4,
        enable_fp_fusion=FP_FUSION_COEFFICIENTS,
    )
    return out


# ------------------------------------------------------------------------------ launchers
def _pad(items: Sequence, n: int, fill):
    items = list(items)
    return items + [fill] * (n - len(items))


def _flat_strides(layout: RowLayout, first: int, count: int, n: int):
    strides = [layout.strides[first + i] for i in range(count)]
    strides = _pad(strides, n, strides[0])
    return [s for st in strides for s in st]


def _chunks(layout: RowLayout, device: torch.device, chunk: Optional[int]):
    return row_chunks(layout, device, BLOCK, chunk)


def _check_coef(coef: torch.Tensor, batch: int) -> None:
    assert coef.dtype == torch.float32 and coef.dim() == 2 and coef.shape == (batch, COEF_COLS)
    assert coef.stride(1) == 1


@on_device_of(lambda xs, *a: xs[0])
def bilinear_forward(xs: Sequence[torch.Tensor], coef: torch.Tensor, square: bool,
                     layout: RowLayout, chunk: Optional[int] = None) -> torch.Tensor:
    """fp32 ``[B]``: ``ℓ_i = c_i · mean_j (Σ_k A_ik x_k)(Σ_k B_ik x_k)`` (0 where ``c_i = 0``).

    ``coef`` is the fp32 ``[B, 16]`` table (unit column stride); ``layout`` describes
    ``xs``. ``chunk`` (a multiple of ``BLOCK``) overrides the row split.
    """
    n = len(xs)
    assert 1 <= n <= MAX_BILINEAR_INPUTS
    B, D = layout.batch, layout.row_numel
    _check_coef(coef, B)
    chunk, n_chunks = _chunks(layout, xs[0].device, chunk)
    partial = torch.empty((B, n_chunks), dtype=torch.float32, device=xs[0].device)
    _, S2, S3 = layout.sizes
    _bilinear_partial_kernel[(B, n_chunks)](
        *_pad(xs, MAX_BILINEAR_INPUTS, xs[0]), coef, partial,
        *_flat_strides(layout, 0, n, MAX_BILINEAR_INPUTS),
        coef.stride(0), D, S2, S3, chunk, n_chunks, 1.0 / D,
        N_IN=n, SQUARE=square, BLOCK=BLOCK, DENSE=layout.dense, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION_ROWS,
    )
    return partial.view(B) if n_chunks == 1 else partial.sum(dim=1)


@on_device_of(lambda xs, *a: xs[0])
def bilinear_backward(xs: Sequence[torch.Tensor], coef: torch.Tensor, grad: torch.Tensor,
                      grads: Sequence[Optional[torch.Tensor]], square: bool,
                      layout: RowLayout, chunk: Optional[int] = None) -> None:
    """Write ``grads[k] = s_i (A_ik v + B_ik u)``, ``s_i = g_i c_i / D``, where not None.

    ``grad`` is the ``[B]`` upstream gradient ``g`` (contiguous); rows with ``s_i = 0`` get
    exact zeros. ``layout`` must describe ``xs`` followed by ``grads[k] or xs[k]``.
    """
    n = len(xs)
    assert len(grads) == n and grad.is_contiguous()
    B = layout.batch
    _check_coef(coef, B)
    chunk, n_chunks = _chunks(layout, xs[0].device, chunk)
    _, S2, S3 = layout.sizes
    write = [g is not None for g in grads]
    outs = [g if g is not None else x for g, x in zip(grads, xs)]
    flags = _pad(write, MAX_BILINEAR_INPUTS, False)
    _bilinear_grad_kernel[(B, n_chunks)](
        *_pad(xs, MAX_BILINEAR_INPUTS, xs[0]), coef, grad,
        *_pad(outs, MAX_BILINEAR_INPUTS, outs[0]),
        *_flat_strides(layout, 0, n, MAX_BILINEAR_INPUTS),
        *_flat_strides(layout, n, n, MAX_BILINEAR_INPUTS),
        coef.stride(0), layout.row_numel, S2, S3, chunk, 1.0 / layout.row_numel,
        N_IN=n, SQUARE=square, BLOCK=BLOCK, DENSE=layout.dense,
        W0=flags[0], W1=flags[1], W2=flags[2], W3=flags[3], W4=flags[4], W5=flags[5],
        num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION_ROWS,
    )


@on_device_of(lambda xs, *a: xs[0])
def linear_forward(xs: Sequence[torch.Tensor], coef: torch.Tensor,
                   outs: Sequence[torch.Tensor], layout: RowLayout,
                   chunk: Optional[int] = None) -> None:
    """Write ``outs[m] = Σ_k C_imk xs[k]`` (fp32 arithmetic, stored in ``outs[m].dtype``).

    ``coef`` is the fp32 ``[B, 16]`` table (``C_mk`` at ``4m + k``); ``layout`` describes
    ``xs`` followed by ``outs``.
    """
    n_in, n_out = len(xs), len(outs)
    assert 1 <= n_in <= MAX_LINEAR_INPUTS and 1 <= n_out <= MAX_LINEAR_OUTPUTS
    B = layout.batch
    _check_coef(coef, B)
    chunk, n_chunks = _chunks(layout, xs[0].device, chunk)
    _, S2, S3 = layout.sizes
    _linear_kernel[(B, n_chunks)](
        *_pad(xs, MAX_LINEAR_INPUTS, xs[0]), *_pad(outs, MAX_LINEAR_OUTPUTS, outs[0]), coef,
        *_flat_strides(layout, 0, n_in, MAX_LINEAR_INPUTS),
        *_flat_strides(layout, n_in, n_out, MAX_LINEAR_OUTPUTS),
        coef.stride(0), layout.row_numel, S2, S3, chunk,
        N_IN=n_in, N_OUT=n_out, BLOCK=BLOCK, DENSE=layout.dense, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION_ROWS,
    )
