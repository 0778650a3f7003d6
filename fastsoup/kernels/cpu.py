"""Launchers of the ``fastsoup._C`` CPU kernels (pybind11, no torch headers).

Buffers in, buffers out. Importing this module imports neither torch nor numpy: the merge
engine calls :func:`weighted_sum` on memory-mapped bytes without torch. The per-sample
MSE launchers take torch tensors of dense rows (checked by :func:`mse_rows_ok`), and
:func:`weighted_sum_list` lists of contiguous CPU tensors (checked by its caller).
"""
from __future__ import annotations

import math
from itertools import chain, compress
from typing import Optional, Sequence

from . import _ext
from .abi import GPU_DTYPES, dtype_code, dtype_name


def extension(warn: bool = False):
    """The loaded ``fastsoup._C`` module, or None (one warning when ``warn``)."""
    return _ext.cpu_ext(warn=warn)


# ------------------------------------------------------------------------ weighted sum
def weighted_sum(out, out_dtype: str, srcs: Sequence, src_dtypes: Sequence[str],
                 weights: Sequence[float], n: int, threads: int = 0, acc64: bool = False,
                 ext=None) -> None:
    """``out[i] = Σ_k weights[k] · srcs[k][i]`` for ``i < n`` (fp32 or fp64 accumulation,
    rounded once). Buffers expose the buffer protocol; dtypes are safetensors names (or
    torch dtypes); no output may overlap an input (the caller checks)."""
    ext = ext or extension(warn=True)
    ext.weighted_sum(out, dtype_code(out_dtype), list(srcs), [dtype_code(d) for d in src_dtypes],
                     list(weights), n, threads, acc64)


def weighted_sum_list(outs, inputs, weights: Sequence[float], ext=None) -> None:
    """``outs[p] = Σ_k weights[k] · inputs[k][p]`` for lists of CPU tensors, in one call of
    the kernel (fp32 accumulation, rounded once), by the tensors' addresses. The caller
    guarantees contiguous tensors of kernel dtypes and no output overlapping an input;
    an input without its output's element count is refused here (the kernel reads
    ``numel`` elements of each by address: never past one)."""
    ext = ext or extension(warn=True)
    if any(len(inp) != len(outs) for inp in inputs):
        raise ValueError("weighted_sum: every input list must have one tensor per output")
    keep = [o.numel() != 0 for o in outs]
    live = list(compress(outs, keep))
    ins = [t for inp in inputs for t in compress(inp, keep)]
    numels = [o.numel() for o in live]
    if [t.numel() for t in ins] != numels * len(inputs):
        raise ValueError("weighted_sum: every inputs[k][p] must have as many elements as outs[p]")
    if not live:
        return
    code = {d: dtype_code(d) for d in {t.dtype for t in chain(live, ins)}}
    ptr = type(live[0]).data_ptr
    ext.weighted_sum_list(list(map(ptr, live)), [code[t.dtype] for t in live],
                          list(map(ptr, ins)), [code[t.dtype] for t in ins], list(weights), numels)


def prefault(buf, page: int) -> None:
    """Touch one byte per ``page`` of ``buf`` (no-op without the extension)."""
    ext = extension()
    if ext is not None:
        ext.prefault(buf, page)


# ------------------------------------------------------------------------ per-sample MSE
def mse_rows_ok(*tensors) -> bool:
    """True when the ``_C`` MSE kernel takes these tensors: CPU, fp32/fp16/bf16, each
    sample's elements contiguous, and the extension loaded."""
    for t in tensors:
        if t.device.type != "cpu" or t.dim() < 1:
            return False
        try:
            if dtype_name(t.dtype) not in GPU_DTYPES:
                return False
        except KeyError:
            return False
        if t.dim() > 1 and not t[0].is_contiguous():
            return False
    return extension() is not None


def _row_stride(t) -> int:
    return t.stride(0) if t.dim() > 0 else 1


def mse_forward(pred, target):
    """fp32 ``[B]`` unweighted per-sample MSE of dense-row CPU tensors."""
    import torch

    B, D = pred.shape[0], math.prod(pred.shape[1:])
    out = torch.empty(B, dtype=torch.float32)
    extension().per_sample_mse_forward(
        pred.data_ptr(), dtype_code(pred.dtype), _row_stride(pred),
        target.data_ptr(), dtype_code(target.dtype), _row_stride(target), out.data_ptr(), B, D)
    return out


def mse_backward(coef, pred, target, grad_pred: Optional[object],
                 grad_target: Optional[object]) -> None:
    """Write ``grad_pred = coef_i (pred − target)`` and/or ``grad_target = −grad_pred``
    (``coef``: contiguous fp32 ``[B]``; gradients laid out with dense rows)."""
    B, D = pred.shape[0], math.prod(pred.shape[1:])
    gp, gt = grad_pred, grad_target
    extension().per_sample_mse_backward(
        pred.data_ptr(), dtype_code(pred.dtype), _row_stride(pred),
        target.data_ptr(), dtype_code(target.dtype), _row_stride(target), coef.data_ptr(),
        gp.data_ptr() if gp is not None else 0, _row_stride(gp) if gp is not None else 0,
        gt.data_ptr() if gt is not None else 0, _row_stride(gt) if gt is not None else 0, B, D)
