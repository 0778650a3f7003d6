"""Multi-tensor weighted sum: ``outs[p] = Σ_k w_k · inputs[k][p]`` in one launch.

The launcher packs, for every tensor ``p`` of the list, the addresses of ``outs[p]`` and
``inputs[0..K-1][p]`` into an int64 device table ``[P, K + 1]``, and splits all tensors
into BLOCK-element blocks described by two small tables (``block_tensor`` int32,
``block_start`` int64). Program ``b`` sums block ``b``: it loads its tensor's K + 1
addresses, accumulates ``w_k · x_k`` in fp32 and stores once. One launch covers the whole
list whatever P and the tensor sizes (no launch per tensor per input).

All inputs of one call share one dtype and all outputs another (the caller groups by
dtype); tensors are contiguous. Offsets are int64.
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
def _weighted_sum_kernel(
    table_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, weights_ptr,
    K: tl.constexpr, IN_T: tl.constexpr, OUT_T: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.load(block_tensor_ptr + b).to(tl.int64)
    start = tl.load(block_start_ptr + b)
    n = tl.load(numel_ptr + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    row = table_ptr + t * (K + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        src = tl.load(row + 1 + k).to(tl.pointer_type(IN_T))
        w = tl.load(weights_ptr + k)
        x = tl.load(src + offs, mask=mask, other=0.0)
        acc += w * x.to(tl.float32)
    dst = tl.load(row).to(tl.pointer_type(OUT_T))
    tl.store(dst + offs, acc.to(OUT_T), mask=mask)


@on_device_of(lambda outs, *a: outs[0])
def weighted_sum_multi(outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                       weights: torch.Tensor) -> None:
    """One launch: ``outs[p] = Σ_k weights[k] · inputs[k][p]``.

    Args:
        outs: P contiguous tensors of one dtype (fp32/fp16/bf16), written.
        inputs: K lists of P contiguous tensors, one dtype for all; ``inputs[k][p]`` has
            ``outs[p].numel()`` elements.
        weights: fp32 ``[K]`` on the tensors' device.
    """
    K = len(inputs)
    table, numel_t, bt, bs = weighted_sum_tables(outs, inputs, BLOCK)
    nb = bt.numel()
    if nb == 0:
        return
    _weighted_sum_kernel[(nb,)](
        table, numel_t, bt, bs, weights,
        K=K, IN_T=_TL[inputs[0][0].dtype], OUT_T=_TL[outs[0].dtype], BLOCK=BLOCK,
        num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
    )
