"""Argument checks shared by the training layer: one rule and one wording each.

The tensor checks every op uses (float tensors, equal shapes) live in
:mod:`fastsoup.ops._checks` and the ``alphas_cumprod`` rule in the ops' schedule helpers;
these are the rules of ``fastsoup.train``'s own arguments:

* :func:`check_int` / :func:`check_nonnegative`: settings (sizes, counts, exponents,
  weights) given as plain Python numbers;
* :func:`check_timesteps`: an integer timestep tensor, its shape and its range;
* :func:`scheduler_alphas_cumprod`: ``alphas_cumprod`` (``[T]`` float) of the duck-typed
  diffusers scheduler the helpers take as ``noise_scheduler``.

All raise ``ValueError`` (bad value) or ``TypeError`` (bad type) naming the argument.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from torch import Tensor

from ..ops._checks import check_timestep_tensor
from ..ops.schedule import alphas_cumprod as _ops_alphas_cumprod
from ..ops.schedule import check_timestep_range


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) ``>= minimum``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_nonnegative(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite number ``>= 0`` (not a ``bool``), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_timesteps(timesteps: Any, *, batch: Optional[int] = None, one_dim: bool = True,
                    low: int = 0, high: Optional[int] = None,
                    bounds: Optional[str] = None) -> Tensor:
    """Check an integer timestep tensor and return it unchanged.

    Args:
        timesteps: must be an integer (not bool, float or complex) ``torch.Tensor``.
        batch: the required length ``B`` of a ``[B]`` tensor (``None``: any length).
        one_dim: require a 1-d tensor (``False``: any shape; ``batch`` is then ignored).
        low, high: every value must lie in ``[low, high)`` (``high=None``: no range check;
            the check costs one host sync, none for an empty tensor or while compiling).
        bounds: how the error message writes the range (default ``"[low, high)"``).
    """
    check_timestep_tensor("timesteps", timesteps, batch, one_dim=one_dim)
    if high is not None:
        check_timestep_range("timesteps", timesteps, low, high, bounds)
    return timesteps


def scheduler_alphas_cumprod(noise_scheduler: Any, *, tensor_ok: bool = False) -> Tensor:
    """``noise_scheduler.alphas_cumprod`` as a non-empty 1-d float tensor (``[T]``).

    ``noise_scheduler`` is duck-typed: anything with ``.alphas_cumprod`` (a diffusers
    DDPM-family scheduler). With ``tensor_ok=True`` the ``[T]`` tensor itself is accepted
    too. Raises ``TypeError`` when there is none, ``ValueError`` when it is malformed.
    """
    if not tensor_ok and getattr(noise_scheduler, "alphas_cumprod", None) is None:
        raise TypeError("noise_scheduler must have .alphas_cumprod (a diffusers DDPM-family "
                        f"scheduler), got {type(noise_scheduler).__name__}")
    return _ops_alphas_cumprod(noise_scheduler, "noise_scheduler")
