"""Argument validation shared by the ops: clear errors that name the argument."""
from __future__ import annotations

import math
import weakref
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Scalar = Union[float, torch.Tensor]
Tensor = torch.Tensor


def check_float_tensor(name: str, t, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have a batch dimension [B, ...], got a {t.dim()}-d tensor")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)} (no broadcasting: a silently broadcast target is a common bug)"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def check_per_sample(name: str, t, batch: int, device: torch.device,
                     floating: bool = True) -> None:
    """``t`` must be a ``[B]`` tensor (per-sample values) on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{batch}], got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the batch is on {device}")


def as_weight(weight: Optional[Union[float, torch.Tensor]], batch: int,
              device: torch.device) -> Optional[torch.Tensor]:
    """Normalise a per-sample weight: None, a Python number, or a ``[B]`` float tensor."""
    if weight is None:
        return None
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        return torch.full((batch,), float(weight), dtype=torch.float32, device=device)
    if isinstance(weight, torch.Tensor) and weight.dim() == 0:
        if not weight.dtype.is_floating_point:
            raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
        return weight.to(device).expand(batch)
    check_per_sample("weight", weight, batch, device)
    return weight


def check_data(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """Float tensors of one shape ``[B, ...]`` with at least one element per sample."""
    for name, t in zip(names, tensors):
        check_float_tensor(name, t)
    for name, t in zip(names[1:], tensors[1:]):
        check_same_shape(names[0], tensors[0], name, t)
    first = tensors[0]
    if first.shape[0] > 0 and first[0].numel() == 0:
        raise ValueError(f"{names[0]} has no elements per sample (shape {tuple(first.shape)})")


SIGNS = {"positive": "> 0", "nonnegative": ">= 0"}


class NonFiniteLossError(FloatingPointError, ValueError):
    """Raised when per-sample losses contain NaN or infinity."""

# Tensors whose values fastsoup made and knows to be valid schedule scalars (finite, of the
# right sign, and small enough in magnitude ratio that no coefficient table overflows):
# the outputs of vp_alpha_sigma and vp_reverse_step_coefficients on a valid schedule. Their
# value checks are skipped, so the steady training path makes no host sync. Keyed by
# identity and checked against the tensor's version counter: an in-place change revokes it.
_VOUCHED: Dict[int, Tuple[weakref.ref, int]] = {}


def vouch(*tensors: Tensor) -> None:
    """Record ``tensors`` as valid schedule scalars (see :func:`is_vouched`)."""
    for t in tensors:
        key = id(t)
        _VOUCHED[key] = (weakref.ref(t, lambda _, key=key: _VOUCHED.pop(key, None)), t._version)


def is_vouched(t) -> bool:
    """True for a tensor :func:`vouch` recorded and nobody has modified in place since."""
    hit = _VOUCHED.get(id(t)) if isinstance(t, Tensor) else None
    return hit is not None and hit[0]() is t and hit[1] == t._version


def per_sample_scalar(name: str, value: Scalar, batch: int, device: torch.device,
                      sign: Optional[str] = None,
                      checks: Optional["DeferredChecks"] = None) -> Tensor:
    """A schedule scalar as a contiguous float ``[B]`` tensor on ``device``.

    Accepts a Python number (made float64), a 0-d float tensor (any device) or a ``[B]``
    float tensor on ``device`` (kept in its dtype; the coefficient tables are computed in float64 from it). Integer
    and bool tensors, tensors that require grad and wrong shapes or devices are refused.

    With ``sign`` (``"positive"`` or ``"nonnegative"``) the values must also be finite and
    of that sign: checked at once for a number, and for a tensor added to ``checks`` (run
    with the caller's other data-dependent checks in one host transfer), except for tensors
    fastsoup made from a valid schedule (:func:`is_vouched`), which need no check.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a float tensor, got bool")
    if isinstance(value, (int, float)):
        if sign is not None:
            v = float(value)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
            if (v <= 0) if sign == "positive" else (v < 0):
                raise ValueError(f"{name} must be {SIGNS[sign]}, got {v}")
        return torch.full((batch,), float(value), dtype=torch.float64, device=device)
    out = _per_sample_scalar_tensor(name, value, batch, device)
    if is_vouched(value):
        if out is not value:
            vouch(out)
        return out
    if sign is not None and checks is not None:
        checks.add(~torch.isfinite(out).all(),
                   lambda: ValueError(f"{name} must be finite, got {_bad_values(out, ~torch.isfinite(out))}"))
        bad_sign = (out <= 0) if sign == "positive" else (out < 0)
        checks.add(bad_sign.any(),
                   lambda: ValueError(f"{name} must be {SIGNS[sign]}, got "
                                      f"{_bad_values(out, (out <= 0) if sign == 'positive' else (out < 0))}"))
    return out


def _bad_values(values: Tensor, bad: Tensor) -> str:
    """``"v (sample i), ..."`` for the first few bad samples (an error path: syncs freely)."""
    idx = bad.nonzero().flatten()[:4].tolist()
    more = " ..." if int(bad.sum()) > len(idx) else ""
    return ", ".join(f"{values[i].item():g} (sample {i})" for i in idx) + more


class DeferredChecks:
    """Data-dependent checks collected, then run in one host transfer.

    ``add(flag, error)``: ``flag`` a 0-d bool tensor, True when the check fails, and
    ``error`` a callable making the exception (called only then, so it may sync to name
    the bad samples). :meth:`run` raises the first failed check in the order added;
    while compiling it does nothing (a sync would break the graph)."""

    def __init__(self) -> None:
        self.items: list = []

    def add(self, flag: Tensor, error) -> None:
        self.items.append((flag, error))

    def run(self) -> None:
        if not self.items or is_compiling():
            return
        dev = self.items[0][0].device
        failed = torch.stack([f.to(dev).reshape(()) for f, _ in self.items]).tolist()
        for bad, (_, error) in zip(failed, self.items):
            if bad:
                raise error()


def _per_sample_scalar_tensor(name: str, value, batch: int, device: torch.device) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a number or a float tensor of shape [B], "
                        f"got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype} "
                        "(convert integer timesteps with vp_alpha_sigma first)")
    if value.requires_grad:
        raise ValueError(f"{name} requires grad, but noise-schedule scalars are constants "
                         f"here (no gradient flows to them): pass {name}.detach()")
    if value.dim() == 0:  # a 0-d tensor is a number: any device
        return value.to(device).expand(batch).contiguous()
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the batch is on {device}")
    if value.dim() != 1 or value.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(value.shape)}")
    return value.contiguous()


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ---------------------------------------------------------------------------- timesteps
def check_timestep_tensor(name: str, t, batch: Optional[int] = None,
                          one_dim: bool = True) -> Tensor:
    """``t`` must be an integer (not bool, float or complex) ``torch.Tensor``; with
    ``one_dim``, of shape ``[B]`` (``[batch]`` when ``batch`` is given). No host sync:
    the range is checked by the caller, batched with its other data-dependent checks
    (see :func:`timestep_range_error`)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if one_dim and (t.dim() != 1 or (batch is not None and t.shape[0] != batch)):
        want = f"[B] = [{batch}]" if batch is not None else "[B]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t


def timestep_range_error(name: str, lo: int, hi: int, low: int, high: int,
                         bounds: Optional[str] = None) -> Optional[ValueError]:
    """The error for timesteps with values in ``[lo, hi]`` outside ``[low, high)``
    (``None`` when they are inside); ``bounds`` is how the message writes the range."""
    if lo >= low and hi < high:
        return None
    where = bounds if bounds is not None else f"[{low}, {high})"
    return ValueError(f"{name} must lie in {where}, got values in [{lo}, {hi}]")


def is_compiling() -> bool:
    """True while torch.compile traces: data-dependent checks (which need a host sync
    and would break the graph) are skipped then; shape, dtype and type checks still run
    at trace time."""
    return torch.compiler.is_compiling()
