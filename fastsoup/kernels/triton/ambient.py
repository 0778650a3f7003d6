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

from ..abi import (COEF_COLS, COEF_KINDS, COL_A, COL_B, COL_SCALE, COL_VALID,
                   MAX_BILINEAR_INPUTS, MAX_LINEAR_INPUTS, MAX_LINEAR_OUTPUTS)
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
_A = tl.constexpr(COL_A)
_B = tl.constexpr(COL_B)
_SCALE = tl.constexpr(COL_SCALE)
_VALID = tl.constexpr(COL_VALID)


@triton.jit
def _row(cb, base: tl.constexpr):
    """Six consecutive table columns from ``base`` (the table has 16: always in bounds)."""
    return (tl.load(cb + base), tl.load(cb + base + 1), tl.load(cb + base + 2),
            tl.load(cb + base + 3), tl.load(cb + base + 4), tl.load(cb + base + 5))


@triton.jit
def _program(coef_ptr, c_sb, CHUNK):
    """This program's sample ``row`` and ``chunk`` (int64), the chunk's first element and
    the sample's coefficient-table row."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    return row, chunk, chunk * CHUNK, coef_ptr + row * c_sb


@triton.jit
def _ldk(xs, strides, k: tl.constexpr, row, j, mask, S2, S3, DENSE: tl.constexpr):
    """Element block ``j`` of sample ``row`` of input ``k`` as fp32."""
    st = strides[k]
    return _ld(xs[k], row, st[0], st[1], st[2], st[3], j, mask, S2, S3, DENSE)


@triton.jit
def _row4(cb, base: tl.constexpr):
    """Four consecutive table columns from ``base``: one output's C_m0..C_m3."""
    return (tl.load(cb + base), tl.load(cb + base + 1), tl.load(cb + base + 2),
            tl.load(cb + base + 3))


@triton.jit
def _bilinear_uv(xs, strides, a, b, row, j, mask, S2, S3,
                 N_IN: tl.constexpr, SQUARE: tl.constexpr, DENSE: tl.constexpr):
    """u = Σ_k a_k x_k and v = Σ_k b_k x_k (v = u when SQUARE) for one block, in fp32.
    ``xs``: the N_IN input pointers; ``strides``: their (batch, s1, s2, s3) strides."""
    u = tl.zeros(j.shape, dtype=tl.float32)
    v = tl.zeros(j.shape, dtype=tl.float32)
    for k in tl.static_range(N_IN):
        x = _ldk(xs, strides, k, row, j, mask, S2, S3, DENSE)
        u += a[k] * x
        v += b[k] * x
    if SQUARE:
        v = u
    return u, v


@triton.jit
def _bilinear_partial_kernel(
    xs, coef_ptr, partial_ptr, strides,
    c_sb, D, S2, S3, CHUNK, n_chunks, inv_D,
    N_IN: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr, DENSE: tl.constexpr,
):
    row, chunk, start, cb = _program(coef_ptr, c_sb, CHUNK)
    a = _row(cb, _A)
    b = _row(cb, _B)
    scale = tl.load(cb + _SCALE)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        j = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < D
        u, v = _bilinear_uv(xs, strides, a, b, row, j, mask, S2, S3, N_IN, SQUARE, DENSE)
        acc += u * v
    total = tl.sum(acc, axis=0) * inv_D
    # scale == 0 (a masked sample) stores an exact 0 even if the row holds inf/NaN
    tl.store(partial_ptr + row * n_chunks + chunk, tl.where(scale == 0.0, 0.0, scale * total))


@triton.jit
def _bilinear_grad_kernel(
    xs, coef_ptr, grad_ptr, gs, strides, gstrides,
    c_sb, D, S2, S3, CHUNK, inv_D,
    N_IN: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr, DENSE: tl.constexpr,
    WRITE: tl.constexpr,
):
    """``gs[k] = s_i (a_k v + b_k u)`` for the inputs whose bit is set in ``WRITE``."""
    row, chunk, start, cb = _program(coef_ptr, c_sb, CHUNK)
    a = _row(cb, _A)
    b = _row(cb, _B)
    s = tl.load(grad_ptr + row).to(tl.float32) * tl.load(cb + _SCALE) * inv_D  # g_i c_i / D
    for off in range(0, CHUNK, BLOCK):
        j = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < D
        u, v = _bilinear_uv(xs, strides, a, b, row, j, mask, S2, S3, N_IN, SQUARE, DENSE)
        for k in tl.static_range(N_IN):
            if (WRITE >> k) & 1:
                # s == 0 (a masked or excluded sample) writes exact zeros even over inf/NaN
                g = tl.where(s == 0.0, 0.0, s * (a[k] * v + b[k] * u))
                gst = gstrides[k]
                gptr = gs[k]
                tl.store(gptr + _offs(row, gst[0], gst[1], gst[2], gst[3], j, S2, S3, DENSE),
                         g.to(gptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_kernel(
    xs, ys, coef_ptr, strides, ystrides,
    c_sb, D, S2, S3, CHUNK,
    N_IN: tl.constexpr, N_OUT: tl.constexpr, BLOCK: tl.constexpr, DENSE: tl.constexpr,
):
    """``ys[m] = Σ_k C_mk xs[k]``, ``C_mk`` at table column 4m + k."""
    row, chunk, start, cb = _program(coef_ptr, c_sb, CHUNK)
    c0 = _row4(cb, 0)
    c1 = _row4(cb, 4)
    c2 = _row4(cb, 8)
    c3 = _row4(cb, 12)
    for off in range(0, CHUNK, BLOCK):
        j = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < D
        y0 = tl.zeros([BLOCK], dtype=tl.float32)
        y1 = tl.zeros([BLOCK], dtype=tl.float32)
        y2 = tl.zeros([BLOCK], dtype=tl.float32)
        y3 = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(N_IN):
            x = _ldk(xs, strides, k, row, j, mask, S2, S3, DENSE)
            y0 += c0[k] * x
            y1 += c1[k] * x
            y2 += c2[k] * x
            y3 += c3[k] * x
        ys_ = (y0, y1, y2, y3)
        for m in tl.static_range(N_OUT):
            yst = ystrides[m]
            yptr = ys[m]
            tl.store(yptr + _offs(row, yst[0], yst[1], yst[2], yst[3], j, S2, S3, DENSE),
                     ys_[m].to(yptr.dtype.element_ty), mask=mask)


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


def _strides(layout: RowLayout, first: int, count: int) -> tuple:
    """The (batch, s1, s2, s3) strides of tensors ``first .. first + count − 1``."""
    return tuple(tuple(layout.strides[first + i]) for i in range(count))


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
        tuple(xs), coef, partial, _strides(layout, 0, n),
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
    write = sum(1 << k for k, g in enumerate(grads) if g is not None)
    outs = tuple(g if g is not None else x for g, x in zip(grads, xs))
    _bilinear_grad_kernel[(B, n_chunks)](
        tuple(xs), coef, grad, outs, _strides(layout, 0, n), _strides(layout, n, n),
        coef.stride(0), layout.row_numel, S2, S3, chunk, 1.0 / layout.row_numel,
        N_IN=n, SQUARE=square, BLOCK=BLOCK, DENSE=layout.dense, WRITE=write,
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
        tuple(xs), tuple(outs), coef, _strides(layout, 0, n_in), _strides(layout, n_in, n_out),
        coef.stride(0), layout.row_numel, S2, S3, chunk,
        N_IN=n_in, N_OUT=n_out, BLOCK=BLOCK, DENSE=layout.dense, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION_ROWS,
    )
