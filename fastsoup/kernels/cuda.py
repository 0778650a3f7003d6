"""Launchers of the ``fastsoup._cuda`` kernels, with the signatures of the Triton
launchers in :mod:`fastsoup.kernels.triton` (so ``ops`` picks either from one table).

The extension's one torch-aware file (``csrc/cuda/bindings.cpp``) checks the tensors and
calls the plain C launchers on the current stream; layouts, chunks and block tables are
planned here, in Python, with :mod:`fastsoup.kernels.layout`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _ext
from .abi import MAX_STRIDED_ROW, MSE_CUDA_CHUNK_QUANTUM, WEIGHTED_SUM_CUDA_BLOCK, dtype_code
from .layout import RowLayout, row_chunks, weighted_sum_tables


def _extension():
    ext = _ext.cuda_ext()
    if ext is None:
        raise RuntimeError(f"fastsoup._cuda is not available ({_ext.load_error('_cuda')})")
    return ext


def _check_rows(layout: RowLayout) -> None:
    if not layout.dense and layout.row_numel > MAX_STRIDED_ROW:
        raise ValueError(f"the CUDA kernels index strided rows of at most {MAX_STRIDED_ROW} "
                         f"elements, got {layout.row_numel}: pass contiguous tensors")


def mse_forward(pred: torch.Tensor, target: torch.Tensor, layout: RowLayout,
                chunk: Optional[int] = None) -> torch.Tensor:
    """fp32 ``[B]`` per-sample MSE (see :func:`fastsoup.kernels.triton.mse.mse_forward`)."""
    _check_rows(layout)
    chunk, n_chunks = row_chunks(layout, pred.device, MSE_CUDA_CHUNK_QUANTUM, chunk)
    partial = _extension().per_sample_mse_forward(
        pred, target, list(layout.sizes), [list(st) for st in layout.strides[:2]],
        layout.dense, chunk, n_chunks)
    return partial.view(-1) if n_chunks == 1 else partial.sum(dim=1)


def mse_backward(coef: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                 grad_pred: Optional[torch.Tensor], grad_target: Optional[torch.Tensor],
                 layout: RowLayout, chunk: Optional[int] = None) -> None:
    """Write ``grad_pred = coef_i (pred − target)`` and/or ``grad_target = −grad_pred``
    (see :func:`fastsoup.kernels.triton.mse.mse_backward`)."""
    _check_rows(layout)
    chunk, n_chunks = row_chunks(layout, pred.device, MSE_CUDA_CHUNK_QUANTUM, chunk)
    _extension().per_sample_mse_backward(
        coef, pred, target, grad_pred, grad_target, list(layout.sizes),
        [list(st) for st in layout.strides], layout.dense, chunk, n_chunks)


def weighted_sum_multi(outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                       weights: torch.Tensor, tables=None, aligned=None):
    """One launch: ``outs[p] = Σ_k weights[k] · inputs[k][p]`` (see
    :func:`fastsoup.kernels.triton.weighted_sum.weighted_sum_multi`; the kernel checks
    alignment per block itself, so ``aligned`` is passed through)."""
    if tables is None:
        tables = weighted_sum_tables(outs, inputs, WEIGHTED_SUM_CUDA_BLOCK)
    table, numel, bt, bs = tables
    if bt.numel() == 0:
        return tables, aligned
    codes = torch.tensor([dtype_code(inp[0].dtype) for inp in inputs], dtype=torch.int32,
                         device=weights.device)
    _extension().weighted_sum(table, numel, bt, bs, weights, codes, len(inputs),
                              dtype_code(outs[0].dtype))
    return tables, aligned
