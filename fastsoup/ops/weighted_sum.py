"""Multi-tensor weighted sum (SPEC §6): ``outs[p] = Σ_k w_k · inputs[k][p]``.

Used by the merge engine's ``--device cuda`` path and to average model replicas on the
GPU (iterative ensemble training). Over whole lists of tensors: the GPU backends run one
launch for the list (not one per tensor per input), reading every input element once and
writing every output element once, accumulating in fp32 and rounding once.

Layers: the PyTorch reference below (the oracle, and the CPU path for fp64, strided or
in-place lists), the backend table (the fused ``fastsoup._C`` kernel for the CPU
otherwise, one call for the lists; the one-launch Triton and CUDA launchers of
:mod:`fastsoup.kernels`, which share one signature), behind the
``torch.library.custom_op`` ``fastsoup::weighted_sum_`` (mutates ``outs``; a fake
implementation is registered).
``outs[p]`` may be one of the ``inputs[k][p]`` (in-place averaging into a replica): every
backend reads all K inputs of an element before writing it. An output that shares memory
with an input at another position (tied weights listed twice, a swap) is computed into a
temporary first on every backend; outputs that share memory with each other are refused.
"""
from __future__ import annotations

import bisect
import collections
import contextvars
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from ..kernels import cpu as cpu_kernels

OP = "weighted_sum"
_backend.register_op(OP, ("reference", "triton", "cuda"), default_gpu="triton",
                     cpu_note="the fastsoup._C kernel (contiguous lists; else the PyTorch reference)")

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- reference
def reference_weighted_sum_(outs: Sequence[Tensor], inputs: Sequence[Sequence[Tensor]],
                            weights: Sequence[float]) -> None:
    """PyTorch reference: accumulate in fp32 (fp64 if any tensor is fp64), in input order
    ``k = 0..K-1``, then round once into ``outs[p]``."""
    for p, out in enumerate(outs):
        acc_dtype = torch.float64 if (out.dtype == torch.float64 or any(
            inp[p].dtype == torch.float64 for inp in inputs)) else torch.float32
        acc = inputs[0][p].to(acc_dtype) * weights[0]
        for k in range(1, len(inputs)):
            acc.add_(inputs[k][p].to(acc_dtype), alpha=weights[k])
        out.copy_(acc)


# ------------------------------------------------------------------------ backend table
def _gpu_launch(backend: str):
    """``weighted_sum_multi(outs, inputs, weights, tables=None, aligned=None)`` of a GPU
    backend (one signature; returns the tables and alignment it launched with)."""
    if backend == "triton":
        from ..kernels.triton.weighted_sum import weighted_sum_multi
    else:
        from ..kernels.cuda import weighted_sum_multi
    return weighted_sum_multi


def _groups(outs, inputs) -> Dict[Tuple, List[int]]:
    groups: Dict[Tuple, List[int]] = {}
    for p, o in enumerate(outs):
        key = (o.dtype,) + tuple(inp[p].dtype for inp in inputs)
        groups.setdefault(key, []).append(p)
    return groups


# (signature, backend) -> [(positions, device tables, aligned)] for lists whose tensors
# are all contiguous: a repeated call launches from these without another pass over them.
_LAUNCHES: "collections.OrderedDict" = collections.OrderedDict()


def _fused(backend: str, outs, inputs, weights, signature=None) -> None:
    """Run ``backend`` over the lists, one launch per dtype signature (normally one)."""
    device = outs[0].device
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=device)
    launch = _gpu_launch(backend)
    plan = _LAUNCHES.get((signature, backend)) if signature is not None else None
    if plan is not None:
        for ps, tables, aligned in plan:
            launch([outs[p] for p in ps], [[inp[p] for p in ps] for inp in inputs], w,
                   tables=tables, aligned=aligned)
        return
    if signature is not None and all(signature[5]):  # every tensor contiguous
        plan = []
        for ps in _groups(outs, inputs).values():
            g_outs, g_inputs = [outs[p] for p in ps], [[inp[p] for p in ps] for inp in inputs]
            plan.append((ps,) + launch(g_outs, g_inputs, w))
        _LAUNCHES[(signature, backend)] = plan
        if len(_LAUNCHES) > _SEEN_SIZE:
            _LAUNCHES.popitem(last=False)
        return
    for key, ps in _groups(outs, inputs).items():
        g_outs, copy_back = [], []
        for p in ps:
            o = outs[p]
            if o.is_contiguous():
                g_outs.append(o)
            else:
                tmp = torch.empty(o.shape, dtype=o.dtype, device=device)
                g_outs.append(tmp)
                copy_back.append((o, tmp))
        # each input is read in its own dtype by the kernel: no converted copies
        g_inputs = [[inp[p].contiguous() for p in ps] for inp in inputs]
        launch(g_outs, g_inputs, w)
        for o, tmp in copy_back:
            o.copy_(tmp)


def _cpu_fused(outs, inputs, weights) -> bool:
    """CPU tensors: the ``fastsoup._C`` kernel, one call for the lists (fp32 accumulation,
    same order and rounding as the reference, multi-threaded), when every tensor is
    contiguous, no output shares memory with an input, and the extension is loaded (and
    built with :func:`~fastsoup.kernels.cpu.weighted_sum_list`). False otherwise: the
    reference computes them."""
    ext = cpu_kernels.extension()
    if ext is None or not hasattr(ext, "weighted_sum_list"):
        return False
    tensors = list(outs) + [t for inp in inputs for t in inp]
    if any(t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in _CPU_DTYPES
           or t.requires_grad for t in tensors):
        return False
    if any(t.dtype == torch.float64 for t in tensors):
        return False  # fp64 asks for fp64 accumulation: the reference does that
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for inp in inputs for t in inp if t.numel())
    starts = [a for a, _ in spans]
    max_end, m = [], 0
    for _, b in spans:
        m = max(m, b)
        max_end.append(m)
    for o in outs:
        if not o.numel():
            continue
        lo, hi = o.data_ptr(), o.data_ptr() + o.numel() * o.element_size()
        i = bisect.bisect_left(starts, hi)  # spans starting before this output ends
        if i and max_end[i - 1] > lo:
            return False  # an output overlaps an input (in place): the reference handles it
    cpu_kernels.weighted_sum_list(outs, inputs, weights, ext=ext)
    return True


_CPU_DTYPES = _KERNEL_DTYPES + (torch.float64,)


def _backend_for(outs: Sequence[Tensor], inputs, signature=None) -> str:
    dtypes = signature[6] if signature is not None else (
        [o.dtype for o in outs] + [t.dtype for inp in inputs for t in inp])
    if any(d not in _KERNEL_DTYPES for d in set(dtypes)):
        return "reference"  # fp64: the checking dtype
    return _backend.choose(OP, outs[0].device).backend


# ------------------------------------------------------------------------ custom op
def _span(t: Tensor) -> Tuple[int, int]:
    """Byte range ``[lo, hi)`` that ``t``'s elements occupy (a superset for strided views)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    lo_off = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st < 0)
    hi_off = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st > 0)
    return t.data_ptr() + lo_off * t.element_size(), t.data_ptr() + (hi_off + 1) * t.element_size()


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def _hazards(outs, inputs) -> List[int]:
    """Outputs that must be computed into a temporary: those sharing memory with an input
    other than themselves at their own position (``outs[p]`` may be ``inputs[k][p]``: every
    backend reads an element's inputs before writing it). Raises when outputs overlap."""
    out_spans = sorted((_span(o) + (p,)) for p, o in enumerate(outs) if o.numel())
    for (lo_a, hi_a, pa), (lo_b, hi_b, pb) in zip(out_spans, out_spans[1:]):
        if lo_b < hi_a:
            raise ValueError(f"outs[{pa}] and outs[{pb}] share memory: each output must be "
                             "its own tensor (list tied parameters once)")
    spans = sorted(_span(t) + (k, p) for k, inp in enumerate(inputs) for p, t in enumerate(inp)
                   if t.numel())
    starts = [sp[0] for sp in spans]
    max_end, m = [], 0
    for sp in spans:
        m = max(m, sp[1])
        max_end.append(m)
    hazards = []
    for p, o in enumerate(outs):
        if not o.numel():
            continue
        lo, hi = _span(o)
        i = bisect.bisect_left(starts, hi) - 1  # spans starting before this output ends
        while i >= 0 and max_end[i] > lo:
            s_lo, s_hi, k, q = spans[i]
            if s_hi > lo and not (q == p and _same_view(o, inputs[k][p])):
                hazards.append(p)
                break
            i -= 1
    return hazards


# Lists seen before (IET averages the same replicas every N steps): their checks and
# hazards depend only on the tensors' addresses, sizes, layouts and dtypes, so a repeated
# call pays for one pass that reads those, not for the checks (see bench_host_cost.py).
_SEEN: "collections.OrderedDict" = collections.OrderedDict()
_SEEN_SIZE = 16
_SIGNATURE: contextvars.ContextVar = contextvars.ContextVar("weighted_sum_signature", default=None)


def _signature(outs, inputs):
    """What the checks and hazards of the lists depend on, or None for anything but
    lists of tensors (the full checks then name the problem)."""
    if not isinstance(outs, (list, tuple)) or not isinstance(inputs, (list, tuple)) or \
            not all(isinstance(inp, (list, tuple)) for inp in inputs):
        return None
    flat = list(outs) + [t for inp in inputs for t in inp]
    if not all(type(t) is Tensor or isinstance(t, Tensor) for t in flat):
        return None
    T = Tensor
    return (len(outs), tuple(map(len, inputs)), str(outs[0].device) if outs else "",
            tuple(map(T.data_ptr, flat)), tuple(map(T.numel, flat)),
            tuple(map(T.is_contiguous, flat)), tuple(t.dtype for t in flat))


def _remember(signature, hazards) -> None:
    _SEEN[signature] = hazards
    if len(_SEEN) > _SEEN_SIZE:
        _SEEN.popitem(last=False)


@torch.library.custom_op("fastsoup::weighted_sum_", mutates_args=("outs",))
def _weighted_sum_op(outs: List[Tensor], inputs: List[Tensor], weights: List[float]) -> None:
    K, P = len(weights), len(outs)
    nested = [inputs[k * P:(k + 1) * P] for k in range(K)]
    signature = _SIGNATURE.get()
    staged = _SEEN.get(signature) if signature is not None else None
    if staged is None:
        staged = _hazards(outs, nested)
        if signature is not None:
            _remember(signature, staged)
    if staged:  # an output overlaps another position's input: compute aside, then copy
        final = list(outs)
        outs = list(outs)
        for p in staged:
            outs[p] = torch.empty_like(outs[p])
        token = _SIGNATURE.set(None)  # the temporaries are new lists: no hazards
        try:
            _weighted_sum_op(outs, inputs, weights)
        finally:
            _SIGNATURE.reset(token)
        for p in staged:
            final[p].copy_(outs[p])
        return
    backend = _backend_for(outs, nested, signature)
    if backend == "reference":
        if outs and outs[0].device.type == "cpu" and _cpu_fused(outs, nested, weights):
            return
        reference_weighted_sum_(outs, nested, weights)
    else:
        _fused(backend, outs, nested, weights, signature)


@_weighted_sum_op.register_fake
def _(outs, inputs, weights):
    return None


# ------------------------------------------------------------------------ public API
def _check_weights(weights, K: int) -> List[float]:
    if isinstance(weights, Tensor):
        if weights.dim() != 1:
            raise ValueError(f"weights must be 1-d [K], got shape {tuple(weights.shape)}")
        weights = weights.detach().cpu().tolist()
    weights = [float(w) for w in weights]
    if K == 0:
        raise ValueError("inputs is empty (need at least one input list)")
    if len(weights) != K:
        raise ValueError(f"got {len(weights)} weights for {K} input lists")
    return weights


def _check(outs, inputs, weights) -> List[float]:
    if isinstance(outs, Tensor) or not isinstance(outs, (list, tuple)):
        raise TypeError("outs must be a list of tensors")
    if isinstance(inputs, Tensor) or not isinstance(inputs, (list, tuple)):
        raise TypeError("inputs must be a list (one entry per input k) of lists of tensors")
    weights = _check_weights(weights, len(inputs))
    K = len(inputs)
    P = len(outs)
    for k, inp in enumerate(inputs):
        if isinstance(inp, Tensor) or not isinstance(inp, (list, tuple)):
            raise TypeError(f"inputs[{k}] must be a list of tensors (one per output)")
        if len(inp) != P:
            raise ValueError(f"inputs[{k}] has {len(inp)} tensors, outs has {P}")
    for p, o in enumerate(outs):
        if not isinstance(o, Tensor) or not o.dtype.is_floating_point:
            raise TypeError(f"outs[{p}] must be a floating tensor, got "
                            f"{getattr(o, 'dtype', type(o).__name__)}")
        for k in range(K):
            t = inputs[k][p]
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"inputs[{k}][{p}] must be a floating tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.shape != o.shape:
                raise ValueError(f"inputs[{k}][{p}] has shape {tuple(t.shape)}, outs[{p}] has "
                                 f"{tuple(o.shape)} (no broadcasting)")
            if t.device != o.device:
                raise ValueError(f"inputs[{k}][{p}] is on {t.device}, outs[{p}] on {o.device}")
    devices = {o.device for o in outs}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return weights


def weighted_sum_(outs: Sequence[Tensor], inputs: Sequence[Sequence[Tensor]],
                  weights: Union[Sequence[float], Tensor]) -> Sequence[Tensor]:
    """``outs[p] = Σ_k weights[k] · inputs[k][p]`` for every ``p``, in place, fused.

    Args:
        outs: P float tensors (fp32/fp16/bf16/fp64, any shapes), overwritten.
        inputs: K lists of P tensors; ``inputs[k][p]`` has the shape of ``outs[p]``
            (any float dtype, may differ from the output's; may be ``outs[p]`` itself).
        weights: K real weights (a sequence or a 1-d tensor; not normalised).

    Returns:
        ``outs``. Accumulation is fp32 (fp64 when a tensor is fp64), rounded once to each
        output dtype. Not differentiable (an in-place update, like an optimizer step).
    """
    signature = _signature(outs, inputs)
    if signature is not None and signature in _SEEN:
        weights = _check_weights(weights, len(inputs))  # the tensors passed before
    else:
        weights = _check(outs, inputs, weights)
    if len(outs) == 0:
        return outs
    flat = [t for inp in inputs for t in inp]
    token = _SIGNATURE.set(signature)
    try:
        _weighted_sum_op(list(outs), flat, weights)
    finally:
        _SIGNATURE.reset(token)
    return outs
