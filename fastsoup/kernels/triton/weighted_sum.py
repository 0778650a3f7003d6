"""Multi-tensor weighted sum: ``outs[p] = Σ_k w_k · inputs[k][p]`` in one launch.

The launcher packs, for every tensor ``p`` of the list, the addresses of ``outs[p]`` and
``inputs[0..K-1][p]`` into an int64 device table ``[P, K + 1]``, and splits all tensors
into BLOCK-element blocks described by two small tables (``block_tensor`` int32,
``block_start`` int64). Program ``b`` sums block ``b``: it loads its tensor's K + 1
addresses, accumulates ``w_k · x_k`` in fp32 and stores once. One launch covers the whole
list whatever P and the tensor sizes (no launch per tensor per input).

Input ``k`` has one dtype across the list and is read in it (inputs may differ from each
other); all outputs share one dtype (the caller groups by dtype signature); tensors are contiguous. Offsets are int64. When every address is 16-byte aligned
(the usual case: the launcher checks) full blocks take an unmasked path that the compiler
turns into 16-byte vector loads and stores; other blocks are masked.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..layout import on_device_of, weighted_sum_tables

BLOCK = 1024
NUM_WARPS = 4
# FMA contraction: off. ``acc + w*x`` then rounds exactly as the PyTorch reference and the
# CPU kernel do, so a soup summed on the GPU is bit-identical to one summed on the CPU.
FP_FUSION = False

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _accumulate(row, weights_ptr, offs, mask, K: tl.constexpr, IN_TS: tl.constexpr,
                MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Σ_k w_k x_k over one block in fp32 (``MASKED=False``: a full block, 16-byte aligned)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        src = tl.load(row + 1 + k).to(tl.pointer_type(IN_TS[k]))  # input k in its own dtype
        w = tl.load(weights_ptr + k)
        if MASKED:
            x = tl.load(src + offs, mask=mask, other=0.0)
        else:
            x = tl.load(tl.multiple_of(src, 16) + offs)
        acc += w * x.to(tl.float32)
    return acc


@triton.jit
def _weighted_sum_kernel(
    table_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, weights_ptr,
    K: tl.constexpr, IN_TS: tl.constexpr, OUT_T: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.load(block_tensor_ptr + b).to(tl.int64)
    start = tl.load(block_start_ptr + b)
    n = tl.load(numel_ptr + t)
    row = table_ptr + t * (K + 1)
    dst = tl.load(row).to(tl.pointer_type(OUT_T))
    if ALIGNED:  # every address 16-byte aligned (checked by the launcher)
        start = tl.multiple_of(start, BLOCK)
        dst = tl.multiple_of(dst, 16)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    if ALIGNED and start + BLOCK <= n:
        # a full block: unmasked, so each thread's elements are one or two 16-byte accesses
        acc = _accumulate(row, weights_ptr, offs, None, K, IN_TS, False, BLOCK)
        tl.store(dst + offs, acc.to(OUT_T))
    else:
        mask = offs < n
        acc = _accumulate(row, weights_ptr, offs, mask, K, IN_TS, True, BLOCK)
        tl.store(dst + offs, acc.to(OUT_T), mask=mask)


@on_device_of(lambda outs, *a: outs[0])
def weighted_sum_multi(outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                       weights: torch.Tensor, tables=None, aligned=None):
    """One launch: ``outs[p] = Σ_k weights[k] · inputs[k][p]``.

    Args:
        outs: P contiguous tensors of one dtype (fp32/fp16/bf16), written.
        inputs: K lists of P contiguous tensors, one dtype for all; ``inputs[k][p]`` has
            ``outs[p].numel()`` elements.
        weights: fp32 ``[K]`` on the tensors' device.
        tables, aligned: what a previous call over the same lists returned (skips
            building them); None computes them.

    Returns:
        ``(tables, aligned)`` for a repeated call.
    """
    K = len(inputs)
    if tables is None:
        tables = weighted_sum_tables(outs, inputs, BLOCK)
    table, numel_t, bt, bs = tables
    if aligned is None:
        aligned = all(t.data_ptr() % 16 == 0 for t in outs) and all(
            t.data_ptr() % 16 == 0 for inp in inputs for t in inp)
    nb = bt.numel()
    if nb == 0:
        return tables, aligned
    _weighted_sum_kernel[(nb,)](
        table, numel_t, bt, bs, weights,
        K=K, IN_TS=tuple(_TL[inp[0].dtype] for inp in inputs), OUT_T=_TL[outs[0].dtype],
        BLOCK=BLOCK,
        ALIGNED=aligned, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
    )
    return tables, aligned
