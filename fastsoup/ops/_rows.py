"""Row layouts: how a fused kernel walks the samples of several same-shaped tensors.

A per-sample reduction sums over every non-batch element, so the order in which a
sample's elements are visited does not matter, only that the same logical element is
read from every tensor. :func:`row_layout` exploits that: it reorders the non-batch
dimensions by the first tensor's strides, merges dimensions that are contiguous in every
tensor, and describes each tensor by a batch stride and at most three inner strides.
Contiguous and channels-last inputs collapse to one dense dimension (``dense=True``, the
fast path); slices and mixed layouts keep up to three strided dimensions; anything more
exotic (rare) returns ``None`` and the caller makes the inputs contiguous.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

MAX_INNER_DIMS = 3


@dataclass(frozen=True)
class RowLayout:
    batch: int                       # B
    row_numel: int                   # D, elements per sample
    sizes: Tuple[int, int, int]      # inner sizes (S1, S2, S3), S1*S2*S3 == D
    strides: Tuple[Tuple[int, int, int, int], ...]  # per tensor: (batch, s1, s2, s3)
    dense: bool                      # every tensor: element j of a row at offset j

    def tensor_strides(self, i: int) -> Tuple[int, int, int, int]:
        return self.strides[i]


def row_layout(tensors: Sequence[torch.Tensor]) -> Optional[RowLayout]:
    """Describe ``tensors`` (same shape ``[B, ...]``) as rows of ``D`` elements.

    Cached on (shape, strides): training loops call it with the same layouts every step.
    """
    return _row_layout(tuple(tensors[0].shape), tuple(tuple(t.stride()) for t in tensors))


@functools.lru_cache(maxsize=256)
def _row_layout(shape: Tuple[int, ...], all_strides: Tuple[Tuple[int, ...], ...]) -> Optional[RowLayout]:
    tensors = all_strides  # one entry per tensor
    batch = shape[0]
    row_numel = 1
    for s in shape[1:]:
        row_numel *= s
    # Inner dims of size > 1, ordered by the first tensor's stride (largest first).
    dims = [d for d in range(1, len(shape)) if shape[d] != 1]
    dims.sort(key=lambda d: -abs(all_strides[0][d]))
    merged: List[Tuple[int, List[int]]] = []  # (size, per-tensor stride)
    for d in dims:
        size = shape[d]
        strides = [st[d] for st in all_strides]
        if merged:
            psize, pstrides = merged[-1]
            if all(ps == s * size for ps, s in zip(pstrides, strides)):
                merged[-1] = (psize * size, strides)
                continue
        merged.append((size, strides))
    if len(merged) > MAX_INNER_DIMS:
        return None
    while len(merged) < MAX_INNER_DIMS:
        merged.insert(0, (1, [0] * len(tensors)))
    sizes = tuple(m[0] for m in merged)
    per_tensor = tuple(
        (all_strides[i][0] if len(shape) else 0,) + tuple(m[1][i] for m in merged)
        for i in range(len(tensors))
    )
    dense = sizes[0] == 1 and sizes[1] == 1 and all(st[3] == 1 for st in per_tensor)
    if row_numel <= 1:
        dense = True
        per_tensor = tuple((st[0], 0, 0, 1) for st in per_tensor)
    return RowLayout(batch, row_numel, sizes, per_tensor, dense)


@functools.lru_cache(maxsize=256)
def plan_chunks(batch: int, row_numel: int, block: int, target_programs: int) -> Tuple[int, int]:
    """Split each row into chunks so that about ``target_programs`` programs run.

    Returns ``(chunk, n_chunks)``: ``chunk`` is a multiple of ``block`` and
    ``n_chunks * chunk >= row_numel``. A batch of one row of 16M elements is spread over
    many programs; a large batch keeps one program per row.
    """
    blocks_per_row = max(1, -(-row_numel // block))
    want = max(1, -(-target_programs // max(batch, 1)))
    n_chunks = min(blocks_per_row, want)
    chunk = -(-blocks_per_row // n_chunks) * block
    n_chunks = -(-row_numel // chunk)
    return chunk, n_chunks
