"""What a diffusers scheduler implies for the loss: its family (DDPM-like or flow
matching), its prediction type, its signal-to-noise ratio and the per-sample weights that
diffusers' training scripts derive from it (min-SNR-γ; the SD3/Flux flow-matching weighting
schemes), and the AGC bank bins of continuous flow-matching timesteps (SPEC §1).

Duck-typed: this module never imports diffusers. :mod:`fastsoup.train.losses` builds the
loss from these.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..ops._checks import check_float_tensor
from ..ops.schedule import schedule_on_device
from ._checks import check_timesteps, scheduler_alphas_cumprod

__all__ = [
    "PREDICTION_TYPES", "FLOW_MATCHING", "WEIGHTING_SCHEMES", "scheduler_family",
    "prediction_type_of", "compute_snr", "min_snr_loss_weights", "flow_matching_loss_weights",
    "flow_matching_bank_timesteps",
]

FLOW_MATCHING = "flow_matching"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", FLOW_MATCHING)
DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers' --weighting_scheme choices (SD3/Flux scripts); logit_normal and mode shape the
# timestep *sampling* density and weight the loss by 1
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap", "logit_normal", "mode")

SUPPORTED_SCHEDULERS = (
    "fastsoup supports DDPM-family schedulers with .alphas_cumprod (DDPMScheduler, "
    "DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, ...; "
    "prediction types epsilon, v_prediction, sample) and flow-matching schedulers "
    "(FlowMatchEulerDiscreteScheduler: SD3, Flux; target noise - latents)"
)


# ----------------------------------------------------------------------------- helpers
def _config_get(noise_scheduler: Any, key: str, default: Any = None) -> Any:
    config = getattr(noise_scheduler, "config", None)
    value = getattr(config, key, None)
    if value is None and isinstance(config, dict):
        value = config.get(key)
    return default if value is None else value


def scheduler_family(noise_scheduler: Any) -> str:
    """``"flow_matching"`` for diffusers' flow-matching schedulers (class name
    ``FlowMatch*``, e.g. ``FlowMatchEulerDiscreteScheduler``), ``"ddpm"`` for schedulers
    with ``.alphas_cumprod``; anything else raises ``TypeError`` naming what is supported."""
    if type(noise_scheduler).__name__.startswith("FlowMatch"):
        return FLOW_MATCHING
    if getattr(noise_scheduler, "alphas_cumprod", None) is not None:
        return "ddpm"
    raise TypeError(f"unsupported scheduler {type(noise_scheduler).__name__} (no "
                    f".alphas_cumprod, not a flow-matching scheduler): {SUPPORTED_SCHEDULERS}")


def prediction_type_of(noise_scheduler: Any, prediction_type: Optional[str] = None) -> str:
    """The prediction type to train with: ``prediction_type`` if given, else the
    scheduler's ``config.prediction_type``; ``"flow_matching"`` for a flow-matching
    scheduler (whose config has none). Raises ``ValueError`` for unknown types and for a
    type that does not fit the scheduler (``"epsilon"`` with a flow-matching scheduler
    would silently train against the wrong target)."""
    flow = type(noise_scheduler).__name__.startswith("FlowMatch")
    if prediction_type is None:
        prediction_type = FLOW_MATCHING if flow else _config_get(noise_scheduler, "prediction_type")
        if prediction_type is None:
            raise ValueError(
                "noise_scheduler has no config.prediction_type: pass prediction_type= "
                f"(one of {PREDICTION_TYPES})")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: fastsoup supports "
                         f"{PREDICTION_TYPES}")
    if flow and prediction_type != FLOW_MATCHING:
        raise ValueError(
            f"prediction_type={prediction_type!r} does not fit {type(noise_scheduler).__name__}: "
            "a flow-matching scheduler trains the velocity target noise - latents "
            "(prediction_type='flow_matching', the default for it)")
    if not flow and prediction_type == FLOW_MATCHING:
        raise ValueError(f"prediction_type='flow_matching' needs a flow-matching scheduler "
                         f"(FlowMatchEulerDiscreteScheduler), got {type(noise_scheduler).__name__}")
    return prediction_type


def num_train_timesteps(noise_scheduler: Any) -> int:
    return int(_config_get(noise_scheduler, "num_train_timesteps", 1000))


def check_ddpm_timesteps(timesteps: Any, batch: Optional[int], num: Optional[int]) -> Tensor:
    return check_timesteps(timesteps, batch=batch, high=num,
                           bounds=f"[0, {num}) (the scheduler's alphas_cumprod has {num} entries)")


def _sqrt_schedules(ac: Tensor, device: torch.device) -> Tuple[Tensor, Tensor]:
    """``sqrt(ᾱ)`` and ``sqrt(1 − ᾱ)`` as diffusers' ``compute_snr`` computes them (in the
    dtype of ``alphas_cumprod``, where it lives), cached on ``device``."""
    return (schedule_on_device(ac, device, "sqrt", lambda a: a ** 0.5),
            schedule_on_device(ac, device, "sqrt_one_minus", lambda a: (1.0 - a) ** 0.5))


# ----------------------------------------------------------------------------- SNR
def compute_snr(noise_scheduler: Any, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio ``SNR(t) = (α_t/σ_t)² = ᾱ_t/(1 − ᾱ_t)`` per sample.

    The same arithmetic as ``diffusers.training_utils.compute_snr`` (square roots in the
    dtype of ``alphas_cumprod``, then float32), so the values match it bit for bit.

    Args:
        noise_scheduler: anything with ``.alphas_cumprod`` (``[T]`` float tensor).
        timesteps: integer ``[B]`` tensor with values in ``[0, T)`` (one host sync checks
            the range; the schedule is cached on the device).

    Returns:
        float32 ``[B]`` on the device of ``timesteps`` (``inf`` where ``ᾱ_t = 1``, ``0``
        where ``ᾱ_t = 0``).
    """
    ac = scheduler_alphas_cumprod(noise_scheduler)
    t = check_ddpm_timesteps(timesteps, None, ac.numel())
    return _snr(ac, t)


def _snr(ac: Tensor, t: Tensor) -> Tensor:
    sqrt_a, sqrt_1ma = _sqrt_schedules(ac, t.device)
    alpha, sigma = sqrt_a[t].float(), sqrt_1ma[t].float()
    return (alpha / sigma) ** 2


def min_snr_loss_weights(noise_scheduler: Any, timesteps: Tensor, snr_gamma: float,
                         prediction_type: Optional[str] = None) -> Tensor:
    """Min-SNR-γ per-sample loss weights (Hang et al. 2023), as diffusers computes them.

    ``w = min(SNR, γ) / SNR`` for ``"epsilon"``, ``min(SNR, γ) / (SNR + 1)`` for
    ``"v_prediction"`` and ``min(SNR, γ)`` for ``"sample"`` (the paper's x0 weight; the
    diffusers scripts leave the weight undivided for other types). Where ``SNR = 0``
    (zero-terminal-SNR schedules) the ε weight is its limit ``1`` instead of diffusers'
    ``0/0 = NaN``. Not defined for flow matching (use ``weighting_scheme``).

    Args:
        noise_scheduler: scheduler with ``.alphas_cumprod`` (and ``.config.prediction_type``
            unless ``prediction_type`` is given).
        timesteps: integer ``[B]`` tensor.
        snr_gamma: ``γ > 0`` (5.0 in the paper).

    Returns:
        float32 ``[B]`` weights on the device of ``timesteps``.
    """
    snr_gamma = check_snr_gamma(snr_gamma)
    ptype = prediction_type_of(noise_scheduler, prediction_type)
    if ptype == FLOW_MATCHING:
        raise ValueError(SNR_FLOW_MESSAGE)
    ac = scheduler_alphas_cumprod(noise_scheduler)
    t = check_ddpm_timesteps(timesteps, None, ac.numel())
    return min_snr_weights(ac, t, snr_gamma, ptype)


SNR_FLOW_MESSAGE = ("snr_gamma (min-SNR-γ) is defined for DDPM-family schedulers; for flow matching "
             "use weighting_scheme= ('sigma_sqrt', 'cosmap', ... as diffusers' SD3/Flux scripts)")


def check_snr_gamma(snr_gamma: Any) -> float:
    if isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float)) or not (snr_gamma > 0):
        raise ValueError(f"snr_gamma must be a positive number, got {snr_gamma!r}")
    return float(snr_gamma)


def min_snr_weights(ac: Tensor, t: Tensor, snr_gamma: float, ptype: str) -> Tensor:
    snr = _snr(ac, t)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if ptype == "epsilon":
        weights = torch.where(snr > 0, weights / snr, torch.ones_like(weights))
    elif ptype == "v_prediction":
        weights = weights / (snr + 1)
    return weights.float()


# ----------------------------------------------------------------------------- flow matching
def flow_matching_loss_weights(weighting_scheme: str, sigmas: Tensor) -> Tensor:
    """Per-sample loss weights of diffusers' SD3/Flux scripts
    (``diffusers.training_utils.compute_loss_weighting_for_sd3``), same arithmetic:

    ``"sigma_sqrt"``: ``σ⁻²``; ``"cosmap"``: ``2/(π(1 − 2σ + 2σ²))``; ``"none"``,
    ``"logit_normal"``, ``"mode"``: 1 (the last two shape the timestep sampling instead).
    Computed in the dtype of ``sigmas`` (as the scripts do), returned as float32 with the
    shape of ``sigmas``.
    """
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got "
                         f"{weighting_scheme!r}")
    if weighting_scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if weighting_scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas ** 2
        return (2 / (math.pi * bot)).float()
    return torch.ones_like(sigmas, dtype=torch.float32)


def flow_matching_bank_timesteps(timesteps: Tensor, num_bins: int,
                                 num_train_timesteps: int = 1000) -> Tensor:
    """Bin continuous flow-matching timesteps (``t = num_train_timesteps·σ``, floats in
    ``[0, num_train_timesteps]``) onto an AGC bank of ``num_bins`` entries (SPEC §1):
    ``⌊t·num_bins/num_train_timesteps⌋``, clamped to ``num_bins − 1``; int64 ``[B]``.
    No host sync (the range is checked by :func:`diffusion_loss`)."""
    t = timesteps.double() * (float(num_bins) / float(num_train_timesteps))
    return t.floor().long().clamp(0, num_bins - 1)


def check_flow_timesteps(timesteps: Any, batch: int) -> Tensor:
    if not isinstance(timesteps, Tensor):
        raise TypeError(f"timesteps must be a torch.Tensor, got {type(timesteps).__name__}")
    if timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be a float or integer tensor, got {timesteps.dtype}")
    if timesteps.dim() != 1 or timesteps.shape[0] != batch:
        raise ValueError(f"timesteps must have shape [B] = [{batch}], got {tuple(timesteps.shape)}")
    return timesteps


def flow_sigmas(sigmas: Any, timesteps: Optional[Tensor], batch: int, num: int,
                 device: torch.device) -> Tensor:
    """``σ`` as a ``[B]`` tensor: ``sigmas`` given as ``[B]`` or ``[B, 1, ..., 1]`` (what
    the scripts' ``get_sigmas`` returns), else ``timesteps / num_train_timesteps``."""
    if sigmas is None:
        if timesteps is None:
            raise ValueError("flow matching needs sigmas= (the σ of each sample, as the "
                             "scripts' get_sigmas returns) or timesteps=")
        return (timesteps.to(device).double() / num).float()
    check_float_tensor("sigmas", sigmas)
    if sigmas.shape[0] != batch or sigmas[0].numel() != 1:
        raise ValueError(f"sigmas must have shape [B] or [B, 1, ..., 1] with B = {batch}, got "
                         f"{tuple(sigmas.shape)}")
    if sigmas.device != device:
        raise ValueError(f"sigmas is on {sigmas.device} but model_pred is on {device}")
    return sigmas.reshape(batch)
