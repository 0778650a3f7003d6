"""Noise-schedule helpers shared by the ops and the training layer (SPEC §3).

``alphas_cumprod`` of a diffusers-style scheduler, integer-timestep validation, the VP
``α_t``/``σ_t`` and the coefficients of one DDPM ancestral step: each written once here.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._checks import check_timestep_tensor, is_compiling, timestep_range_error, vouch


class ReverseStepCoefficients(NamedTuple):
    """Per-sample float32 ``[B]`` coefficients of one VP ancestral step ``t → s``."""

    alpha_t: Tensor
    sigma_t: Tensor
    alpha_s: Tensor
    sigma_s: Tensor
    c_o: Tensor   # sqrt(max(σ_s² − c_f², 0)): multiplies ε̂
    c_f: Tensor   # (σ_s/σ_t)·sqrt(1 − α_t²/α_s²): multiplies the fresh noise ξ


def alphas_cumprod(schedule, name: str = "schedule") -> Tensor:
    """``alphas_cumprod`` of a diffusers-style scheduler (or the tensor itself), checked."""
    ac = getattr(schedule, "alphas_cumprod", schedule)
    if not isinstance(ac, Tensor):
        try:
            ac = torch.as_tensor(ac)
        except Exception:
            raise TypeError(f"{name} must be a scheduler with .alphas_cumprod or a 1-d "
                            f"tensor of alphas_cumprod, got {type(schedule).__name__}") from None
    if ac.dim() != 1 or not ac.dtype.is_floating_point or ac.numel() == 0:
        raise ValueError("alphas_cumprod must be a non-empty 1-d float tensor, got "
                         f"{ac.dtype} of shape {tuple(ac.shape)}")
    return ac


def check_timesteps(name: str, t, num: int, device: Optional[torch.device] = None) -> Tensor:
    """``t`` (an int or an integer tensor of shape ``[]`` or ``[B]``) as a 1-d integer
    tensor with values in ``[0, num)``; TypeError/ValueError naming ``name`` otherwise.
    The range check costs one host sync for a tensor (none for an int, none while
    compiling)."""
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(t, int):
        if not 0 <= t < num:
            raise timestep_range_error(name, t, t, 0, num, f"[0, {num - 1}] (the scheduler's timesteps)")
        return torch.tensor([t], device=device)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    check_timestep_tensor(name, t, one_dim=False)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(t.shape)}")
    check_timestep_range(name, t, 0, num, f"[0, {num - 1}] (the scheduler's timesteps)")
    return t


def check_timestep_range(name: str, t: Tensor, low: int, high: int,
                         bounds: Optional[str] = None) -> None:
    """Every value of ``t`` in ``[low, high)``: one host sync (min and max in one
    transfer); skipped for an empty tensor and while compiling."""
    if t.numel() == 0 or is_compiling():
        return
    lo, hi = torch.stack([t.min(), t.max()]).tolist()
    err = timestep_range_error(name, lo, hi, low, high, bounds)
    if err is not None:
        raise err


# The schedule on each device, made once: indexing it then costs no host-to-device copy
# (a copy of a pageable CPU tensor blocks the host, like a sync). Keyed by the identity
# and version of the alphas_cumprod tensor (an in-place change makes a new entry).
_DEVICE_SCHEDULES: Dict[Tuple[int, str, str], Tuple[weakref.ref, int, Tensor]] = {}


def schedule_on_device(ac: Tensor, device: torch.device, kind: str = "float64",
                       make: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """``make(ac)`` (default: ``ac`` in float64) on ``device``, cached per schedule tensor,
    device and ``kind``; computed where ``ac`` lives, then copied once."""
    if make is None:
        make = lambda a: a.to(torch.float64)  # noqa: E731
    if is_compiling():
        return make(ac).to(device)
    key = (id(ac), str(torch.device(device)), kind)
    hit = _DEVICE_SCHEDULES.get(key)
    if hit is not None and hit[0]() is ac and hit[1] == ac._version:
        return hit[2]
    value = make(ac).to(device)
    if len(_DEVICE_SCHEDULES) > 64:  # schedules are few; drop the ones that died
        for k in [k for k, v in _DEVICE_SCHEDULES.items() if v[0]() is None]:
            del _DEVICE_SCHEDULES[k]
    _DEVICE_SCHEDULES[key] = (weakref.ref(ac), ac._version, value)
    return value


_HOST_SCHEDULES: Dict[int, Tuple[weakref.ref, int, list]] = {}


def schedule_values(ac: Tensor) -> list:
    """``alphas_cumprod`` as Python floats (float64), read once per schedule tensor: host
    arithmetic on a fixed timestep (``t_n``) then costs no tensor read per call."""
    hit = _HOST_SCHEDULES.get(id(ac))
    if hit is not None and hit[0]() is ac and hit[1] == ac._version:
        return hit[2]
    values = ac.detach().to(device="cpu", dtype=torch.float64).tolist()
    _HOST_SCHEDULES[id(ac)] = (weakref.ref(ac), ac._version, values)
    return values


def vp_alpha_sigma(schedule, timesteps) -> Tuple[Tensor, Tensor]:
    """``α_t = sqrt(ᾱ_t)``, ``σ_t = sqrt(1 − ᾱ_t)`` as float32 ``[B]`` tensors.

    ``schedule`` is a diffusers-style scheduler (anything with ``.alphas_cumprod``) or the
    ``alphas_cumprod`` tensor itself (shape ``[T]``); ``timesteps`` an int or an integer
    ``[B]`` tensor in ``[0, T)``. Results live on the device of ``timesteps`` (computed
    in float64, then rounded once).
    """
    ac = alphas_cumprod(schedule)
    device = timesteps.device if isinstance(timesteps, Tensor) else ac.device
    t = check_timesteps("timesteps", timesteps, ac.numel(), device)
    return vp_alpha_sigma_unchecked(ac, t)


# Smallest ᾱ whose α = sqrt(ᾱ) keeps every ambient coefficient table finite in float32
# (1/α² ≤ 1e30); a schedule reaching below it still works, its scalars are just checked.
MIN_VOUCHED_ALPHA_BAR = 1e-30


def schedule_is_valid(ac: Tensor) -> bool:
    """Every ᾱ finite and in [MIN_VOUCHED_ALPHA_BAR, 1] (read once per schedule tensor)."""
    values = schedule_values(ac)
    return all(MIN_VOUCHED_ALPHA_BAR <= v <= 1.0 for v in values)  # NaN fails both


def vp_alpha_sigma_unchecked(ac: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`vp_alpha_sigma` for timesteps already known to be in range (no host sync:
    the schedule is cached on the device of ``t``). On a valid schedule the results are
    vouched for (:func:`fastsoup.ops._checks.vouch`): the losses skip their value checks."""
    abar = schedule_on_device(ac, t.device)[t]
    alpha, sigma = abar.sqrt().float(), (1.0 - abar).clamp_min(0).sqrt().float()
    if not is_compiling() and schedule_is_valid(ac):
        vouch(alpha, sigma)
    return alpha, sigma


def vp_reverse_step_coefficients(schedule, t, s) -> ReverseStepCoefficients:
    """Coefficients of the DDPM ancestral step ``t → s`` (``s ≤ t``), per sample.

        ``c_f = (σ_s/σ_t)·sqrt(1 − α_t²/α_s²)``,  ``c_o = sqrt(max(σ_s² − c_f², 0))``,
        ``x_s = α_s ĥ_t + c_o ε̂_t + c_f ξ``.

    ``schedule``: a scheduler with ``.alphas_cumprod`` or that tensor; ``t``, ``s``: ints
    or integer ``[B]`` tensors. ``s = t`` gives the identity step (``c_f = 0``).
    """
    ac = alphas_cumprod(schedule)
    device = t.device if isinstance(t, Tensor) else (s.device if isinstance(s, Tensor) else ac.device)
    tt = check_timesteps("t", t, ac.numel(), device)
    ss = check_timesteps("s", s, ac.numel(), device)
    if tt.shape != ss.shape and tt.numel() != 1 and ss.numel() != 1:
        raise ValueError(f"t and s must have the same shape, got {tuple(tt.shape)} and {tuple(ss.shape)}")
    tt, ss = torch.broadcast_tensors(tt, ss.to(tt.device))
    if tt.numel() and not is_compiling() and bool((ss > tt).any()):
        raise ValueError("s must not exceed t (a reverse step goes from t down to s)")
    a = schedule_on_device(ac, tt.device)
    abar_t, abar_s = a[tt], a[ss]
    alpha_t, sigma_t = abar_t.sqrt(), (1 - abar_t).clamp_min(0).sqrt()
    alpha_s, sigma_s = abar_s.sqrt(), (1 - abar_s).clamp_min(0).sqrt()
    ratio = torch.where(sigma_t > 0, sigma_s / torch.where(sigma_t > 0, sigma_t, torch.ones_like(sigma_t)),
                        torch.zeros_like(sigma_t))
    c_f = ratio * (1 - abar_t / abar_s).clamp_min(0).sqrt()
    c_o = (sigma_s ** 2 - c_f ** 2).clamp_min(0).sqrt()
    out = ReverseStepCoefficients(*(v.float() for v in (alpha_t, sigma_t, alpha_s, sigma_s, c_o, c_f)))
    if not is_compiling() and schedule_is_valid(ac):
        vouch(*out)
    return out
