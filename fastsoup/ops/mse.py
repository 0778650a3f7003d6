"""Fused per-sample mean squared error (SPEC §1).

``per_sample_mse(pred, target, weight=None)`` returns ``ℓ_i = w_i · mean((pred_i −
target_i)²)`` as fp32 ``[B]``. The fused implementations read ``pred`` and ``target``
once in the forward pass and once more in the backward pass, where they write the
gradient directly; nothing of size ``[B, D]`` is allocated besides the gradient itself.

Layers (Liger-style): the PyTorch reference below, the Triton launchers in
``fastsoup.triton.mse``, the CUDA kernels in ``csrc/cuda`` (``fastsoup._cuda``), all
behind one ``torch.library.custom_op`` pair (forward, backward) with fake (meta)
implementations and registered autograd, so the op works under ``torch.compile`` and
passes ``torch.library.opcheck``. The weight multiplies the ``[B]`` result outside the
fused op, so autograd also differentiates the weight when it requires grad.
"""
from __future__ import annotations

import math

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from ._checks import as_weight, check_float_tensor, check_same_shape
from ._rows import plan_chunks, row_layout

OP = "per_sample_mse"
_backend.register_op(OP, ("reference", "triton", "cuda"), default_gpu="triton",
                     cpu_note="the fastsoup._C kernel (dense rows; else the PyTorch reference)")


# ----------------------------------------------------------------------------- reference
def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def reference_forward(pred: Tensor, target: Tensor) -> Tensor:
    """Unweighted per-sample MSE in fp32 (fp64 if an input is fp64). Shape ``[B]``.

    Plain PyTorch with one ``[B, D]`` temporary (the difference, squared in place): the
    CPU path, the test oracle and the benchmark baseline of the fused kernels.
    """
    acc = _acc_dtype(pred, target)
    diff = torch.sub(pred.to(acc), target.to(acc))
    return diff.square_().reshape(pred.shape[0], math.prod(pred.shape[1:])).mean(dim=1)


def reference_backward(grad: Tensor, pred: Tensor, target: Tensor,
                       pred_grad: bool, target_grad: bool) -> Tuple[Tensor, Tensor]:
    """``grad_pred = 2 g_i (pred − target) / D`` (exact zeros where ``g_i == 0``) and
    ``grad_target = −grad_pred``, in the inputs' dtypes; an empty tensor for a gradient
    that is not requested."""
    acc = _acc_dtype(pred, target)
    B = pred.shape[0]
    D = math.prod(pred.shape[1:])
    coef = (grad.to(acc) * (2.0 / D)).view((B,) + (1,) * (pred.dim() - 1))
    g = torch.sub(pred.to(acc), target.to(acc)).mul_(coef)
    zero_rows = coef == 0
    if bool(zero_rows.any()):
        g.masked_fill_(zero_rows, 0.0)  # excluded rows: exact zeros even for inf/NaN inputs
    # Gradients in the layouts empty_like gives (what the fake implementation promises).
    gp = torch.empty_like(pred).copy_(g) if pred_grad else pred.new_empty(0)
    gt = torch.empty_like(target).copy_(g.neg_()) if target_grad else target.new_empty(0)
    return gp, gt


# ------------------------------------------------------------------------ fused backends
def _fused_layout(tensors):
    layout = row_layout(tensors)
    if layout is None:  # more than three non-mergeable inner dims: rare, copy once
        tensors = [t.contiguous() for t in tensors]
        layout = row_layout(tensors)
    return tensors, layout


def _fused_forward(backend: str, pred: Tensor, target: Tensor) -> Tensor:
    (pred, target), layout = _fused_layout([pred, target])
    if backend == "triton":
        from ..triton import mse as tmse

        return tmse.mse_forward(pred, target, layout)
    from ..kernels import _ext

    chunk, n_chunks = _cuda_chunks(pred, layout)
    partial = _ext.cuda_ext().per_sample_mse_forward(
        pred, target, list(layout.sizes), [list(st) for st in layout.strides[:2]],
        layout.dense, chunk, n_chunks,
    )
    return partial.view(-1) if n_chunks == 1 else partial.sum(dim=1)


CUDA_CHUNK_QUANTUM = 1024  # the CUDA kernels require chunks that are multiples of this


def _cuda_chunks(pred: Tensor, layout) -> Tuple[int, int]:
    from ..triton._util import target_programs

    return plan_chunks(layout.batch, layout.row_numel, CUDA_CHUNK_QUANTUM,
                       target_programs(pred.device))


def _fused_backward(backend: str, grad: Tensor, pred: Tensor, target: Tensor,
                    pred_grad: bool, target_grad: bool) -> Tuple[Tensor, Tensor]:
    D = math.prod(pred.shape[1:])
    coef = grad.to(torch.float32) * (2.0 / D)
    if not coef.is_contiguous():
        coef = coef.contiguous()
    gp = torch.empty_like(pred) if pred_grad else None
    gt = torch.empty_like(target) if target_grad else None
    tensors = [pred, target, gp if gp is not None else pred, gt if gt is not None else target]
    layout = row_layout(tensors)
    if layout is None:  # > 3 non-mergeable inner dims (rare): compute contiguous, copy out
        out_gp, out_gt = gp, gt
        gp, gt = _fused_backward(backend, grad, pred.contiguous(), target.contiguous(),
                                 pred_grad, target_grad)
        if out_gp is not None:
            out_gp.copy_(gp)
        if out_gt is not None:
            out_gt.copy_(gt)
        return (out_gp if out_gp is not None else pred.new_empty(0),
                out_gt if out_gt is not None else target.new_empty(0))
    if backend == "triton":
        from ..triton import mse as tmse

        tmse.mse_backward(coef, pred, target, gp, gt, layout)
    else:
        from ..kernels import _ext

        chunk, n_chunks = _cuda_chunks(pred, layout)
        _ext.cuda_ext().per_sample_mse_backward(
            coef, pred, target, gp, gt, list(layout.sizes),
            [list(st) for st in layout.strides], layout.dense, chunk, n_chunks,
        )
    return (gp if gp is not None else pred.new_empty(0),
            gt if gt is not None else target.new_empty(0))


def _backend_for(pred: Tensor, target: Tensor) -> str:
    if pred.dtype == torch.float64 or target.dtype == torch.float64:
        return "reference"  # float64 is the checking dtype: the reference handles it
    if pred.shape[0] == 0:
        return "reference"
    return _backend.choose(OP, pred.device).backend


# ----------------------------------------------------------------- CPU fast path (_C)
_C_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cpu_rows(*tensors: Tensor):
    """The fastsoup._C kernel when every tensor is a CPU tensor of dense rows (each
    sample's elements contiguous) in fp32/fp16/bf16; else None."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in _C_CODES or t.dim() < 1:
            return None
        if t.dim() > 1 and not t[0].is_contiguous():
            return None
    from ..kernels import _ext

    return _ext.cpu_ext(warn=False)


def _grads_dense(pred: Tensor, target: Tensor, pred_grad: bool, target_grad: bool) -> bool:
    """empty_like keeps the inputs' (dense-row) layouts only for dense, non-overlapping
    inputs; otherwise the reference path handles the layouts."""
    return all(not need or (t.dim() < 2 or torch.empty_like(t)[0].is_contiguous())
               for t, need in ((pred, pred_grad), (target, target_grad)))


def _row_stride(t: Tensor) -> int:
    return t.stride(0) if t.dim() > 0 else 1


def _cpu_forward(ext, pred: Tensor, target: Tensor) -> Tensor:
    B, D = pred.shape[0], math.prod(pred.shape[1:])
    out = torch.empty(B, dtype=torch.float32)
    ext.per_sample_mse_forward(pred.data_ptr(), _C_CODES[pred.dtype], _row_stride(pred),
                               target.data_ptr(), _C_CODES[target.dtype], _row_stride(target),
                               out.data_ptr(), B, D)
    return out


def _cpu_backward(ext, grad: Tensor, pred: Tensor, target: Tensor, pred_grad: bool,
                  target_grad: bool) -> Tuple[Tensor, Tensor]:
    B, D = pred.shape[0], math.prod(pred.shape[1:])
    coef = (grad.to(torch.float32) * (2.0 / D)).contiguous()
    gp = torch.empty_like(pred) if pred_grad else None
    gt = torch.empty_like(target) if target_grad else None
    ext.per_sample_mse_backward(
        pred.data_ptr(), _C_CODES[pred.dtype], _row_stride(pred),
        target.data_ptr(), _C_CODES[target.dtype], _row_stride(target), coef.data_ptr(),
        gp.data_ptr() if gp is not None else 0, _row_stride(gp) if gp is not None else 0,
        gt.data_ptr() if gt is not None else 0, _row_stride(gt) if gt is not None else 0, B, D)
    return (gp if gp is not None else pred.new_empty(0),
            gt if gt is not None else target.new_empty(0))


def _forward_impl(pred: Tensor, target: Tensor, backend: str) -> Tensor:
    if backend == "reference":
        ext = _cpu_rows(pred, target) if pred.shape[0] else None
        if ext is not None:
            return _cpu_forward(ext, pred, target)
        return reference_forward(pred, target)
    return _fused_forward(backend, pred, target)


def _backward_impl(grad: Tensor, pred: Tensor, target: Tensor,
                   pred_grad: bool, target_grad: bool, backend: str) -> Tuple[Tensor, Tensor]:
    if backend == "reference":
        ext = _cpu_rows(pred, target) if pred.shape[0] else None
        if ext is not None and _grads_dense(pred, target, pred_grad, target_grad):
            return _cpu_backward(ext, grad, pred, target, pred_grad, target_grad)
        return reference_backward(grad, pred, target, pred_grad, target_grad)
    return _fused_backward(backend, grad, pred, target, pred_grad, target_grad)


# ------------------------------------------------------------------------ custom ops
# The registered ops are what torch.compile traces (and what opcheck checks). In eager
# mode the same implementations run through a plain autograd.Function, which avoids the
# per-call Python overhead of the custom-op dispatcher (~100 µs, more than the whole
# kernel time at SD-latent sizes).
#
# The backend is chosen once, in the forward pass, and handed to the backward pass: the
# backward of CUDA tensors runs on autograd's device thread, which does not see the
# caller's thread-local fs.use_backend() override.
@torch.library.custom_op("fastsoup::per_sample_mse", mutates_args=())
def _per_sample_mse_op(pred: Tensor, target: Tensor) -> Tensor:
    return _forward_impl(pred, target, _backend_for(pred, target))


@_per_sample_mse_op.register_fake
def _(pred, target):
    return pred.new_empty((pred.shape[0],), dtype=_acc_dtype(pred, target))


@torch.library.custom_op("fastsoup::per_sample_mse_backward", mutates_args=())
def _per_sample_mse_backward_op(grad: Tensor, pred: Tensor, target: Tensor,
                                pred_grad: bool, target_grad: bool,
                                backend: str = "") -> Tuple[Tensor, Tensor]:
    if backend not in _backend.BACKENDS:
        backend = _backend_for(pred, target)
    return _backward_impl(grad, pred, target, pred_grad, target_grad, backend)


@_per_sample_mse_backward_op.register_fake
def _(grad, pred, target, pred_grad, target_grad, backend=""):
    gp = torch.empty_like(pred) if pred_grad else pred.new_empty(0)
    gt = torch.empty_like(target) if target_grad else target.new_empty(0)
    return gp, gt


def _setup_context(ctx, inputs, output):
    pred, target = inputs
    ctx.save_for_backward(pred, target)
    ctx.backend = _backend_for(pred, target)


def _backward(ctx, grad):
    pred, target = ctx.saved_tensors
    pred_grad, target_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (pred_grad or target_grad):
        return None, None
    gp, gt = _per_sample_mse_backward_op(grad, pred, target, pred_grad, target_grad,
                                         ctx.backend)
    return (gp if pred_grad else None), (gt if target_grad else None)


_per_sample_mse_op.register_autograd(_backward, setup_context=_setup_context)


class _PerSampleMSEFunction(torch.autograd.Function):
    """Eager-mode twin of the registered op (same implementations, less overhead)."""

    @staticmethod
    def forward(ctx, pred, target):
        ctx.save_for_backward(pred, target)
        ctx.backend = _backend_for(pred, target)
        return _forward_impl(pred, target, ctx.backend)

    @staticmethod
    def backward(ctx, grad):
        pred, target = ctx.saved_tensors
        pred_grad, target_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (pred_grad or target_grad):
            return None, None
        gp, gt = _backward_impl(grad, pred, target, pred_grad, target_grad, ctx.backend)
        return (gp if pred_grad else None), (gt if target_grad else None)


def per_sample_mse_unweighted(pred: Tensor, target: Tensor) -> Tensor:
    """The fused op without argument checks: the registered custom op while
    ``torch.compile`` traces, the autograd.Function otherwise."""
    if torch.compiler.is_compiling():
        return _per_sample_mse_op(pred, target)
    return _PerSampleMSEFunction.apply(pred, target)


# ------------------------------------------------------------------------ public API
def per_sample_mse(pred: Tensor, target: Tensor,
                   weight: Optional[Union[float, Tensor]] = None) -> Tensor:
    """Per-sample mean squared error, fused: ``w_i · mean_flat((pred_i − target_i)²)``.

    Args:
        pred: ``[B, ...]`` float16, bfloat16 or float32 (any strides).
        target: same shape as ``pred``; its dtype may differ from ``pred``'s.
        weight: optional per-sample weight: a number or a ``[B]`` float tensor.

    Returns:
        ``[B]`` float32 (float64 when an input is float64), differentiable with respect
        to ``pred``, ``target`` and ``weight`` (whichever require grad).
    """
    check_float_tensor("pred", pred)
    check_float_tensor("target", target)
    check_same_shape("pred", pred, "target", target)
    if pred.shape[0] > 0 and math.prod(pred.shape[1:]) == 0:
        raise ValueError(f"pred has no elements per sample (shape {tuple(pred.shape)})")
    w = as_weight(weight, pred.shape[0], pred.device)
    mse = per_sample_mse_unweighted(pred, target)
    return mse if w is None else mse * w.to(mse.dtype)
