"""Per-sample mean squared error: forward partial sums and the backward gradient.

Both kernels walk a :class:`fastsoup.kernels.layout.RowLayout`: program ``(row, chunk)``
handles ``CHUNK`` consecutive elements of one sample. Offsets are int64 throughout.
Accumulation is fp32 whatever the input dtypes; no ``[B, D]`` temporary is created.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..layout import RowLayout, on_device_of, row_chunks
from .rows import inner_offsets as _inner_offsets

BLOCK = 1024
NUM_WARPS = 4
# FMA contraction: on. ``acc += d * d`` fused rounds once (at least as exact as unfused);
# no expression here needs unfused rounding. Set on every launch (the default may change).
FP_FUSION = True


@triton.jit
def _mse_partial_kernel(
    pred_ptr, target_ptr, partial_ptr,
    p_sb, p_s1, p_s2, p_s3,
    t_sb, t_s1, t_s2, t_s3,
    D, S2, S3, CHUNK, n_chunks, inv_D,
    BLOCK: tl.constexpr, DENSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    start = chunk * CHUNK
    pred_row = pred_ptr + row * p_sb
    target_row = target_ptr + row * t_sb
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        j = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < D
        p = tl.load(pred_row + _inner_offsets(j, p_s1, p_s2, p_s3, S2, S3, DENSE), mask=mask, other=0.0)
        t = tl.load(target_row + _inner_offsets(j, t_s1, t_s2, t_s3, S2, S3, DENSE), mask=mask, other=0.0)
        d = p.to(tl.float32) - t.to(tl.float32)
        acc += d * d
    tl.store(partial_ptr + row * n_chunks + chunk, tl.sum(acc, axis=0) * inv_D)


@triton.jit
def _mse_grad_kernel(
    pred_ptr, target_ptr, coef_ptr, gpred_ptr, gtarget_ptr,
    p_sb, p_s1, p_s2, p_s3,
    t_sb, t_s1, t_s2, t_s3,
    gp_sb, gp_s1, gp_s2, gp_s3,
    gt_sb, gt_s1, gt_s2, gt_s3,
    D, S2, S3, CHUNK,
    BLOCK: tl.constexpr, DENSE: tl.constexpr,
    WRITE_PRED: tl.constexpr, WRITE_TARGET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    start = chunk * CHUNK
    coef = tl.load(coef_ptr + row)
    for off in range(0, CHUNK, BLOCK):
        j = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < D
        p = tl.load(pred_ptr + row * p_sb + _inner_offsets(j, p_s1, p_s2, p_s3, S2, S3, DENSE), mask=mask, other=0.0)
        t = tl.load(target_ptr + row * t_sb + _inner_offsets(j, t_s1, t_s2, t_s3, S2, S3, DENSE), mask=mask, other=0.0)
        # coef == 0 (an excluded sample) writes exact zeros even if the row holds inf/NaN.
        g = tl.where(coef == 0.0, 0.0, coef * (p.to(tl.float32) - t.to(tl.float32)))
        if WRITE_PRED:
            gp = gpred_ptr + row * gp_sb + _inner_offsets(j, gp_s1, gp_s2, gp_s3, S2, S3, DENSE)
            tl.store(gp, g.to(gpred_ptr.dtype.element_ty), mask=mask)
        if WRITE_TARGET:
            gt = gtarget_ptr + row * gt_sb + _inner_offsets(j, gt_s1, gt_s2, gt_s3, S2, S3, DENSE)
            tl.store(gt, (-g).to(gtarget_ptr.dtype.element_ty), mask=mask)


@on_device_of(lambda pred, *a, **k: pred)
def mse_forward(pred: torch.Tensor, target: torch.Tensor, layout: RowLayout,
                chunk: Optional[int] = None) -> torch.Tensor:
    """fp32 ``[B]`` per-sample MSE. ``chunk`` (a multiple of BLOCK) overrides the split."""
    B, D = layout.batch, layout.row_numel
    chunk, n_chunks = row_chunks(layout, pred.device, BLOCK, chunk)
    partial = torch.empty((B, n_chunks), dtype=torch.float32, device=pred.device)
    ps, ts = layout.strides[0], layout.strides[1]
    _, S2, S3 = layout.sizes
    _mse_partial_kernel[(B, n_chunks)](
        pred, target, partial,
        *ps, *ts,
        D, S2, S3, chunk, n_chunks, 1.0 / D,
        BLOCK=BLOCK, DENSE=layout.dense, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
    )
    return partial.view(B) if n_chunks == 1 else partial.sum(dim=1)


@on_device_of(lambda coef, pred, *a, **k: pred)
def mse_backward(coef: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                 grad_pred: Optional[torch.Tensor], grad_target: Optional[torch.Tensor],
                 layout: RowLayout, chunk: Optional[int] = None) -> None:
    """Write ``grad_pred = coef_i (pred - target)`` and/or ``grad_target = -grad_pred``.

    ``coef`` is fp32 ``[B]`` (``2 g_i / D``); ``layout`` must describe
    ``[pred, target, grad_pred or pred, grad_target or target]``.
    """
    B, D = layout.batch, layout.row_numel
    chunk, n_chunks = row_chunks(layout, pred.device, BLOCK, chunk)
    _, S2, S3 = layout.sizes
    gp = grad_pred if grad_pred is not None else pred
    gt = grad_target if grad_target is not None else target
    _mse_grad_kernel[(B, n_chunks)](
        pred, target, coef, gp, gt,
        *layout.strides[0], *layout.strides[1], *layout.strides[2], *layout.strides[3],
        D, S2, S3, chunk,
        BLOCK=BLOCK, DENSE=layout.dense,
        WRITE_PRED=grad_pred is not None, WRITE_TARGET=grad_target is not None,
        num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
    )
