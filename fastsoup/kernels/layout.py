"""Layouts and launch geometry shared by every launcher (Triton, CUDA, CPU).

* Row layouts: how a fused kernel walks the samples of several same-shaped tensors.

A per-sample reduction sums over every non-batch element, so the order in which a
sample's elements are visited does not matter, only that the same logical element is
read from every tensor. :func:`row_layout` exploits that: it reorders the non-batch
dimensions by the first tensor's strides, merges dimensions that are contiguous in every
tensor, and describes each tensor by a batch stride and at most three inner strides.
Contiguous and channels-last inputs collapse to one dense dimension (``dense=True``, the
fast path); slices and mixed layouts keep up to three strided dimensions; anything more
exotic (rare) returns ``None``: :func:`launch_rows` then runs the kernel on contiguous
copies (the one contiguous retry).

* Chunk planning (:func:`plan_chunks`, :func:`row_chunks`): how many programs split a row,
  within the grid limits of the hardware.
* The device guard (launch on the tensors' GPU) and the block tables of the multi-tensor
  weighted sum (:func:`weighted_sum_tables`).
"""
from __future__ import annotations

import collections
import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

MAX_INNER_DIMS = 3
# CUDA grid limits: x up to 2^31 - 1 blocks, y and z up to 65535. Row kernels launch
# (rows, chunks) grids, so the number of chunks of a row is capped at MAX_GRID_Y.
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_Y = 65535


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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


def row_chunks(layout: RowLayout, device: torch.device, block: int,
               chunk: Optional[int] = None) -> Tuple[int, int]:
    """``(chunk, n_chunks)`` of a ``(B, n_chunks)`` row-kernel launch on ``device``.

    ``chunk`` (a multiple of ``block``) overrides the planned split, except that a row is
    never split into more than :data:`MAX_GRID_Y` chunks (the grid's y limit): a chunk too
    small for that is enlarged to the smallest multiple of ``block`` that fits.
    """
    B, D = layout.batch, layout.row_numel
    if B > MAX_GRID_X:
        raise ValueError(f"batch of {B} rows exceeds the grid limit of {MAX_GRID_X}")
    if chunk is None:
        chunk, n_chunks = plan_chunks(B, D, block, target_programs(device))
    else:
        if chunk <= 0 or chunk % block:
            raise ValueError(f"chunk must be a positive multiple of {block}, got {chunk}")
        n_chunks = -(-D // chunk)
    if n_chunks > MAX_GRID_Y:
        chunk = _cdiv(_cdiv(D, MAX_GRID_Y), block) * block
        n_chunks = _cdiv(D, chunk)
    return chunk, n_chunks


def launch_rows(inputs: Sequence[torch.Tensor], outputs: Sequence[Optional[torch.Tensor]],
                launch: Callable):
    """Run ``launch(inputs, outputs, layout)`` over one :class:`RowLayout` of the inputs
    followed by the outputs (``outputs[i] = None``: not written, described by
    ``inputs[i]``), and return its result.

    When the tensors have no common layout (more than three inner dimensions that cannot
    merge: rare), the kernel runs on contiguous copies of the inputs into contiguous
    outputs that are then copied back: the one contiguous retry of every launcher.
    """
    inputs, outputs = list(inputs), list(outputs)

    def described(ins, outs):
        return ins + [o if o is not None else ins[i] for i, o in enumerate(outs)]

    layout = row_layout(described(inputs, outputs))
    if layout is not None:
        return launch(inputs, outputs, layout)
    c_inputs = [x.contiguous() for x in inputs]
    c_outputs = [None if o is None else torch.empty(o.shape, dtype=o.dtype, device=o.device)
                 for o in outputs]
    result = launch(c_inputs, c_outputs, row_layout(described(c_inputs, c_outputs)))
    for o, c in zip(outputs, c_outputs):
        if o is not None:
            o.copy_(c)
    return result


# ----------------------------------------------------------------------------- devices
@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """About how many programs keep ``device`` busy for a bandwidth-bound kernel."""
    if device.type == "cuda":
        return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: few programs keep tests fast but still exercise chunking


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current while launching (Triton launches on the current device)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_device_of(pick):
    """Decorator: run a launcher with the GPU of ``pick(*args)`` current."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with device_guard(pick(*args)):
                return fn(*args, **kwargs)
        return inner
    return wrap


# ----------------------------------------------------------------- multi-tensor tables
_TABLES: "collections.OrderedDict" = collections.OrderedDict()
TABLE_CACHE_SIZE = 16


def weighted_sum_tables(outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                        block: int):
    """Device tables of a one-launch multi-tensor weighted sum over ``block``-element blocks.

    Returns ``(ptrs int64 [P, K + 1], numel int64 [P], block_tensor int32 [nb],
    block_start int64 [nb])``: the addresses of ``outs[p]`` then ``inputs[0..K-1][p]``,
    each tensor's size, and for every block the tensor it belongs to and its first element.

    The tables depend only on the addresses and sizes, so they are cached on those (a few
    recent lists per device): averaging the same replicas every N steps, or re-running a
    merge window layout, builds them once and then pays only for the key.
    """
    device = outs[0].device
    K = len(inputs)
    rows = [(outs[p].data_ptr(),) + tuple(inputs[k][p].data_ptr() for k in range(K))
            for p in range(len(outs))]
    numels = [o.numel() for o in outs]
    key = (str(device), block, tuple(rows), tuple(numels))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    tables = _build_weighted_sum_tables(rows, numels, block, device)
    _TABLES[key] = tables
    if len(_TABLES) > TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return tables


def _build_weighted_sum_tables(rows, numels, block: int, device):
    """Vectorised on ``device``: block ``b`` of tensor ``p`` starts at element
    ``(b − first_block[p]) · block``."""
    ptrs = torch.tensor(rows, dtype=torch.int64, device=device)
    numel = torch.tensor(numels, dtype=torch.int64, device=device)
    n_blocks = [_cdiv(n, block) for n in numels]
    total = sum(n_blocks)
    if total > MAX_GRID_X:
        raise ValueError(f"{total} blocks exceed the grid limit of {MAX_GRID_X}")
    counts = torch.tensor(n_blocks, dtype=torch.int64, device=device)
    ids = torch.repeat_interleave(torch.arange(len(numels), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    starts = (torch.arange(total, dtype=torch.int64, device=device) - first[ids]) * block
    return ptrs, numel, ids.to(torch.int32), starts
