"""Fused per-sample mean squared error (SPEC §1).

``per_sample_mse(pred, target, weight=None)`` returns ``ℓ_i = w_i · mean((pred_i −
target_i)²)`` as fp32 ``[B]``. The fused implementations read ``pred`` and ``target``
once in the forward pass and once more in the backward pass, where they write the
gradient directly; nothing of size ``[B, D]`` is allocated besides the gradient itself.

The module reads top to bottom: the PyTorch reference (the CPU path, the test oracle and
the benchmark baseline), the backend table (the ``fastsoup._C`` CPU kernel for dense rows,
the Triton and CUDA launchers of :mod:`fastsoup.kernels`, which share one signature),
the registration (a custom-op pair with fakes and registered autograd, so the op works
under ``torch.compile`` and passes ``torch.library.opcheck``, plus its eager twin: see
:mod:`fastsoup.ops._registration`) and the public function. The weight multiplies the ``[B]`` result outside the
fused op, so autograd also differentiates the weight when it requires grad.
"""
from __future__ import annotations

import math

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from ..kernels import cpu as cpu_kernels
from ..kernels.layout import launch_rows
from ._checks import as_weight, check_float_tensor, check_same_shape
from ._registration import FusedOp, chosen_backend, grads_or_none, no_grads

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


# ------------------------------------------------------------------------ backend table
def _gpu_launchers(backend: str):
    """The launcher module of a GPU backend: ``mse_forward``/``mse_backward`` over a row
    layout, one signature for Triton and CUDA."""
    if backend == "triton":
        from ..kernels.triton import mse as launchers
    else:
        from ..kernels import cuda as launchers
    return launchers


def _backend_for(pred: Tensor, target: Tensor) -> str:
    if pred.dtype == torch.float64 or target.dtype == torch.float64:
        return "reference"  # float64 is the checking dtype: the reference handles it
    if pred.shape[0] == 0:
        return "reference"
    return _backend.choose(OP, pred.device).backend


def _grads_dense(pred: Tensor, target: Tensor, pred_grad: bool, target_grad: bool) -> bool:
    """empty_like keeps the inputs' (dense-row) layouts only for dense, non-overlapping
    inputs; otherwise the reference path handles the layouts."""
    return all(not need or (t.dim() < 2 or torch.empty_like(t)[0].is_contiguous())
               for t, need in ((pred, pred_grad), (target, target_grad)))


def _forward_impl(pred: Tensor, target: Tensor, backend: str) -> Tensor:
    if backend == "reference":
        if pred.shape[0] and cpu_kernels.mse_rows_ok(pred, target):
            return cpu_kernels.mse_forward(pred, target)
        return reference_forward(pred, target)
    launchers = _gpu_launchers(backend)
    return launch_rows([pred, target], [],
                       lambda ins, outs, layout: launchers.mse_forward(*ins, layout))


def _backward_impl(grad: Tensor, pred: Tensor, target: Tensor, pred_grad: bool,
                   target_grad: bool, backend: str) -> Tuple[Tensor, Tensor]:
    if backend == "reference" and not (
            pred.shape[0] and cpu_kernels.mse_rows_ok(pred, target)
            and _grads_dense(pred, target, pred_grad, target_grad)):
        return reference_backward(grad, pred, target, pred_grad, target_grad)
    D = math.prod(pred.shape[1:])
    coef = (grad.to(torch.float32) * (2.0 / D)).contiguous()
    gp = torch.empty_like(pred) if pred_grad else None
    gt = torch.empty_like(target) if target_grad else None
    if backend == "reference":
        cpu_kernels.mse_backward(coef, pred, target, gp, gt)
    else:
        launchers = _gpu_launchers(backend)
        launch_rows([pred, target], [gp, gt], lambda ins, outs, layout: launchers.mse_backward(
            coef, ins[0], ins[1], outs[0], outs[1], layout))
    return (gp if gp is not None else pred.new_empty(0),
            gt if gt is not None else target.new_empty(0))


# ------------------------------------------------------------------------ registration
def _forward(pred: Tensor, target: Tensor) -> Tensor:
    return _forward_impl(pred, target, _backend_for(pred, target))


def _fake_forward(pred, target):
    return pred.new_empty((pred.shape[0],), dtype=_acc_dtype(pred, target))


def _backward(grad: Tensor, pred: Tensor, target: Tensor, pred_grad: bool, target_grad: bool,
              backend: str = "") -> Tuple[Tensor, Tensor]:
    backend = chosen_backend(backend, lambda: _backend_for(pred, target))
    return _backward_impl(grad, pred, target, pred_grad, target_grad, backend)


def _fake_backward(grad, pred, target, pred_grad, target_grad, backend=""):
    gp = torch.empty_like(pred) if pred_grad else pred.new_empty(0)
    gt = torch.empty_like(target) if target_grad else target.new_empty(0)
    return gp, gt


def _setup(ctx, inputs, output):
    pred, target = inputs
    ctx.save_for_backward(pred, target)
    ctx.backend = _backend_for(pred, target)


def _grad(ctx, needs, grad, run):
    pred, target = ctx.saved_tensors
    if no_grads(needs[:2]):
        return None, None
    grads = run(grad, pred, target, bool(needs[0]), bool(needs[1]), ctx.backend)
    return tuple(grads_or_none(grads, needs[:2]))


_OP = FusedOp("per_sample_mse", _forward, _fake_forward, setup=_setup, grad=_grad,
              backward=_backward, fake_backward=_fake_backward)


def per_sample_mse_unweighted(pred: Tensor, target: Tensor) -> Tensor:
    """The fused op without argument checks (the custom op while ``torch.compile`` traces,
    its eager twin otherwise)."""
    return _OP(pred, target)


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
