"""Noise-schedule helpers shared by the ops and the training layer (SPEC §3).

``alphas_cumprod`` of a diffusers-style scheduler, integer-timestep validation, the VP
``α_t``/``σ_t`` and the coefficients of one DDPM ancestral step: each written once here.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor


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
    tensor with values in ``[0, num)``; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(t, int):
        t = torch.tensor([t], device=device)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num):
        raise ValueError(f"{name} must lie in [0, {num - 1}] (the scheduler's timesteps), "
                         f"got values in [{int(t.min())}, {int(t.max())}]")
    return t


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
    abar = ac.to(device=t.device, dtype=torch.float64)[t]
    return abar.sqrt().float(), (1.0 - abar).clamp_min(0).sqrt().float()


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
    if tt.numel() and bool((ss > tt).any()):
        raise ValueError("s must not exceed t (a reverse step goes from t down to s)")
    a = ac.to(device=tt.device, dtype=torch.float64)
    abar_t, abar_s = a[tt], a[ss]
    alpha_t, sigma_t = abar_t.sqrt(), (1 - abar_t).clamp_min(0).sqrt()
    alpha_s, sigma_s = abar_s.sqrt(), (1 - abar_s).clamp_min(0).sqrt()
    ratio = torch.where(sigma_t > 0, sigma_s / torch.where(sigma_t > 0, sigma_t, torch.ones_like(sigma_t)),
                        torch.zeros_like(sigma_t))
    c_f = ratio * (1 - abar_t / abar_s).clamp_min(0).sqrt()
    c_o = (sigma_s ** 2 - c_f ** 2).clamp_min(0).sqrt()
    return ReverseStepCoefficients(*(v.float() for v in (alpha_t, sigma_t, alpha_s, sigma_s, c_o, c_f)))
