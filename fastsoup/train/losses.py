"""The diffusion training loss from what a diffusers training script has at hand.

:func:`diffusion_loss` takes the scheduler, the network output and the ``latents`` /
``noise`` / ``timesteps`` of the batch and returns ``(loss, stats)``:

1. the regression target by ``noise_scheduler.config.prediction_type``
   (:func:`diffusion_target`): ``"epsilon"`` → ``noise``; ``"v_prediction"`` →
   ``noise_scheduler.get_velocity(latents, noise, timesteps)`` (or ``α_t ε − σ_t x_0``
   from ``alphas_cumprod`` when the scheduler has no ``get_velocity``); ``"sample"`` →
   ``latents``;
2. optional min-SNR-γ weights (:func:`min_snr_loss_weights`), computed exactly as
   diffusers' ``train_text_to_image.py`` does;
3. the fused per-sample loss :func:`fastsoup.agc_loss` with top-k exclusion
   (``exclude_k`` / ``exclude_fraction``), the AGC memory bank (``bank``) or no exclusion,
   ``L = Σ m_i w_i ℓ_i / K`` (SPEC §1).

The scheduler is duck-typed: anything with ``.config.prediction_type``,
``.alphas_cumprod`` (``[T]``) and optionally ``get_velocity`` works (``DDPMScheduler``,
``DDIMScheduler``, ...), and so do diffusers' flow-matching schedulers (class name
``FlowMatch*``: ``FlowMatchEulerDiscreteScheduler`` of SD3 and Flux; see below). Any other
scheduler raises a ``TypeError`` saying what is supported. This module never imports
diffusers.

Replacing the loss block of diffusers' ``examples/text_to_image/train_text_to_image.py``
---------------------------------------------------------------------------------------
Before (diffusers)::

    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")

    # Predict the noise residual and compute loss
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

    if args.snr_gamma is None:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:
        snr = compute_snr(noise_scheduler, timesteps)
        mse_loss_weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(
            dim=1
        )[0]
        if noise_scheduler.config.prediction_type == "epsilon":
            mse_loss_weights = mse_loss_weights / snr
        elif noise_scheduler.config.prediction_type == "v_prediction":
            mse_loss_weights = mse_loss_weights / (snr + 1)

        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
        loss = loss.mean()

After (fastsoup; one bank per model, created once before the loop and saved with the
checkpoint, e.g. ``accelerator.register_for_checkpointing(bank)``)::

    # before the loop (ratio 1.25 as in the Stable Diffusion reference code):
    bank = fs.AGCMemoryBank(noise_scheduler.config.num_train_timesteps, ratio=1.25).to(accelerator.device)

    # the loss block:
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss, agc_stats = fs.train.diffusion_loss(
        noise_scheduler, model_pred, latents=latents, noise=noise, timesteps=timesteps,
        snr_gamma=args.snr_gamma, bank=bank,   # or exclude_fraction=0.1, or neither
    )

``snr_gamma=None`` and no exclusion give the same value and gradient as
``F.mse_loss(model_pred.float(), target.float())``; with ``snr_gamma`` the same as the
weighted block above. With exclusion, the mean runs over the kept samples only. Under
``accelerate``/DDP pass ``process_group=True`` to select on the global batch (SPEC §1).
``agc_stats.as_dict()`` gives the exclusion rate for logging.

Flow matching (SD3, Flux: ``train_dreambooth_sd3.py``, ``train_dreambooth_flux.py``)
----------------------------------------------------------------------------------
The scripts noise ``x_σ = (1 − σ) x_0 + σ ε`` with continuous ``timesteps = 1000·σ`` and
regress ``noise − latents``, weighted by ``compute_loss_weighting_for_sd3``. Their loss
block::

    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2
                       ).reshape(target.shape[0], -1), 1).mean()

becomes (same value; the bank bins the continuous timesteps, ``⌊t·T_bank/1000⌋``)::

    bank = fs.AGCMemoryBank(1000, ratio=1.25).to(accelerator.device)   # once
    loss, agc_stats = fs.train.diffusion_loss(
        noise_scheduler_copy, model_pred, latents=model_input, noise=noise,
        timesteps=timesteps, sigmas=sigmas, weighting_scheme=args.weighting_scheme,
        bank=bank)   # precondition_outputs=True, noisy_latents=noisy_model_input for SD3's option

No ``prediction_type`` is needed: passing ``'epsilon'`` (or any DDPM type) with a
flow-matching scheduler raises instead of training against the wrong target.

Host syncs per call: two (one transfer for the range checks, one inside ``agc_loss``);
the schedule tensors are cached on the device.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from ..ops._checks import check_float_tensor, check_same_shape, is_compiling
from ..ops.agc import AGCMemoryBank, AGCStats, agc_loss, fail_on_every_rank
from ..ops.schedule import schedule_on_device
from ._checks import check_timesteps, scheduler_alphas_cumprod

__all__ = [
    "PREDICTION_TYPES",
    "FLOW_MATCHING",
    "WEIGHTING_SCHEMES",
    "scheduler_family",
    "prediction_type_of",
    "compute_snr",
    "min_snr_loss_weights",
    "flow_matching_loss_weights",
    "flow_matching_bank_timesteps",
    "diffusion_target",
    "diffusion_loss",
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


def _num_train_timesteps(noise_scheduler: Any) -> int:
    return int(_config_get(noise_scheduler, "num_train_timesteps", 1000))


def _check_timesteps(timesteps: Any, batch: Optional[int], num: Optional[int]) -> Tensor:
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
    t = _check_timesteps(timesteps, None, ac.numel())
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
    snr_gamma = _check_snr_gamma(snr_gamma)
    ptype = prediction_type_of(noise_scheduler, prediction_type)
    if ptype == FLOW_MATCHING:
        raise ValueError(_SNR_FLOW)
    ac = scheduler_alphas_cumprod(noise_scheduler)
    t = _check_timesteps(timesteps, None, ac.numel())
    return _min_snr(ac, t, snr_gamma, ptype)


_SNR_FLOW = ("snr_gamma (min-SNR-γ) is defined for DDPM-family schedulers; for flow matching "
             "use weighting_scheme= ('sigma_sqrt', 'cosmap', ... as diffusers' SD3/Flux scripts)")


def _check_snr_gamma(snr_gamma: Any) -> float:
    if isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float)) or not (snr_gamma > 0):
        raise ValueError(f"snr_gamma must be a positive number, got {snr_gamma!r}")
    return float(snr_gamma)


def _min_snr(ac: Tensor, t: Tensor, snr_gamma: float, ptype: str) -> Tensor:
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


def _check_flow_timesteps(timesteps: Any, batch: int) -> Tensor:
    if not isinstance(timesteps, Tensor):
        raise TypeError(f"timesteps must be a torch.Tensor, got {type(timesteps).__name__}")
    if timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be a float or integer tensor, got {timesteps.dtype}")
    if timesteps.dim() != 1 or timesteps.shape[0] != batch:
        raise ValueError(f"timesteps must have shape [B] = [{batch}], got {tuple(timesteps.shape)}")
    return timesteps


def _flow_sigmas(sigmas: Any, timesteps: Optional[Tensor], batch: int, num: int,
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


# ----------------------------------------------------------------------------- target
def diffusion_target(noise_scheduler: Any, *, latents: Optional[Tensor] = None,
                     noise: Optional[Tensor] = None, timesteps: Optional[Tensor] = None,
                     prediction_type: Optional[str] = None) -> Tensor:
    """The regression target of the network for the scheduler's prediction type.

    * ``"epsilon"``: ``noise`` (needs ``noise``);
    * ``"v_prediction"``: ``v = α_t ε − σ_t x_0`` (needs all three): the scheduler's own
      ``get_velocity(latents, noise, timesteps)`` when it has one, else computed here from
      ``alphas_cumprod`` in float32 and cast to the dtype of ``latents``;
    * ``"sample"``: ``latents`` (needs ``latents``);
    * ``"flow_matching"`` (``FlowMatchEulerDiscreteScheduler``): ``noise − latents``
      (needs both), as diffusers' SD3/Flux scripts.

    Args:
        latents: clean ``x_0``, ``[B, ...]`` float tensor.
        noise: ``ε``, same shape.
        timesteps: integer ``[B]`` tensor in ``[0, T)``.
        prediction_type: overrides ``noise_scheduler.config.prediction_type`` (like the
            ``--prediction_type`` flag of the diffusers scripts, without mutating the
            scheduler's config).
    """
    ptype = prediction_type_of(noise_scheduler, prediction_type)
    return _target(noise_scheduler, ptype, latents, noise, timesteps)


def _target(noise_scheduler: Any, ptype: str, latents, noise, timesteps,
            check_range: bool = True) -> Tensor:
    need = {"epsilon": ("noise",), "v_prediction": ("latents", "noise", "timesteps"),
            "sample": ("latents",), FLOW_MATCHING: ("latents", "noise")}[ptype]
    given = {"latents": latents, "noise": noise, "timesteps": timesteps}
    missing = [n for n in need if given[n] is None]
    if missing:
        raise ValueError(f"prediction_type={ptype!r} needs {', '.join(need)}; missing: "
                         f"{', '.join(missing)}")
    if latents is not None:
        check_float_tensor("latents", latents)
    if noise is not None:
        check_float_tensor("noise", noise)
    if latents is not None and noise is not None:
        check_same_shape("latents", latents, "noise", noise)
    if ptype == "epsilon":
        return noise
    if ptype == "sample":
        return latents
    if ptype == FLOW_MATCHING:
        return noise - latents
    ac = scheduler_alphas_cumprod(noise_scheduler)
    if check_range:
        _check_timesteps(timesteps, latents.shape[0], ac.numel())
    get_velocity = getattr(noise_scheduler, "get_velocity", None)
    if callable(get_velocity):
        return get_velocity(latents, noise, timesteps)
    acf = schedule_on_device(ac, latents.device, "float32", lambda a: a.to(torch.float32))
    acf = acf[timesteps.to(latents.device)]
    shape = (latents.shape[0],) + (1,) * (latents.dim() - 1)
    a = acf.sqrt().view(shape)
    s = (1.0 - acf).clamp_min(0).sqrt().view(shape)
    return (a * noise.float() - s * latents.float()).to(latents.dtype)


# ----------------------------------------------------------------------------- loss
def _check_weight(weight: Any, batch: int, device: torch.device) -> None:
    if isinstance(weight, Tensor):
        if not weight.dtype.is_floating_point:
            raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
        if weight.dim() not in (0, 1) or (weight.dim() == 1 and weight.shape[0] != batch):
            raise ValueError(f"weight must be a number or have shape [B] = [{batch}], "
                             f"got {tuple(weight.shape)}")
        if weight.device != device:
            raise ValueError(f"weight is on {weight.device} but model_pred is on {device}")
    elif isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight must be a number or a [B] float tensor, got {type(weight).__name__}")


def _prepare(noise_scheduler, model_pred, latents, noise, timesteps, sigmas, snr_gamma,
             weighting_scheme, precondition_outputs, noisy_latents, bank, weight,
             prediction_type):
    """Every check and the inputs of :func:`fastsoup.agc_loss`: ``(pred, target, weight,
    bank timesteps)``. The data-dependent range checks cost one host sync together."""
    check_float_tensor("model_pred", model_pred)
    family = scheduler_family(noise_scheduler)
    ptype = prediction_type_of(noise_scheduler, prediction_type)
    batch, device = model_pred.shape[0], model_pred.device
    if batch == 0:
        raise ValueError("model_pred has an empty batch (B = 0)")
    if bank is not None and timesteps is None:
        raise ValueError("bank= needs timesteps= (one timestep per sample)")
    range_checks = []  # (name, tensor, low, high, bounds): one transfer for all
    w = None
    pred = model_pred
    if family == FLOW_MATCHING:
        if snr_gamma is not None:
            raise ValueError(_SNR_FLOW)
        num = _num_train_timesteps(noise_scheduler)
        if timesteps is not None:
            _check_flow_timesteps(timesteps, batch)
            range_checks.append(("timesteps", timesteps, 0, num,
                                 f"[0, {num}] (flow matching: t = {num}·σ)", True))
        scheme = "none" if weighting_scheme is None else weighting_scheme
        if scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got "
                             f"{weighting_scheme!r}")
        need_sigma = scheme in ("sigma_sqrt", "cosmap") or precondition_outputs
        sig = None
        if need_sigma or sigmas is not None:
            sig = _flow_sigmas(sigmas, timesteps, batch, num, device)
            range_checks.append(("sigmas", sig, 0, 1, "[0, 1]", True))
        if scheme in ("sigma_sqrt", "cosmap"):
            w = flow_matching_loss_weights(scheme, sig)
        target = _target(noise_scheduler, ptype, latents, noise, timesteps)
        if precondition_outputs:
            # the SD3 scripts' preconditioning: x̂_0 = pred·(−σ) + x_σ against x_0
            if noisy_latents is None:
                raise ValueError("precondition_outputs=True needs noisy_latents= (x_σ, the "
                                 "network input)")
            check_float_tensor("noisy_latents", noisy_latents)
            check_same_shape("model_pred", model_pred, "noisy_latents", noisy_latents)
            shape = (batch,) + (1,) * (model_pred.dim() - 1)
            sig_b = (sigmas if sigmas is not None else sig).reshape(shape)
            pred = model_pred * (-sig_b) + noisy_latents
            target = latents
    else:
        if weighting_scheme is not None:
            raise ValueError("weighting_scheme= applies to flow-matching schedulers "
                             f"(FlowMatchEulerDiscreteScheduler); for {type(noise_scheduler).__name__} "
                             "use snr_gamma=")
        if precondition_outputs or sigmas is not None or noisy_latents is not None:
            raise ValueError("sigmas=, precondition_outputs= and noisy_latents= apply to "
                             "flow-matching schedulers only")
        num = scheduler_alphas_cumprod(noise_scheduler).numel()
        if timesteps is not None:
            check_timesteps(timesteps, batch=batch)
            range_checks.append(("timesteps", timesteps, 0, num,
                                 f"[0, {num}) (the scheduler's alphas_cumprod has {num} entries)",
                                 False))
        target = _target(noise_scheduler, ptype, latents, noise, timesteps, check_range=False)
        if snr_gamma is not None:
            if timesteps is None:
                raise ValueError("snr_gamma= needs timesteps= (one integer timestep per sample)")
            snr_gamma = _check_snr_gamma(snr_gamma)
    check_same_shape("model_pred", model_pred, "target", target)
    if weight is not None:
        _check_weight(weight, batch, device)
    _check_ranges(range_checks)
    if family != FLOW_MATCHING and snr_gamma is not None:
        ac = scheduler_alphas_cumprod(noise_scheduler)
        w = _min_snr(ac, timesteps, snr_gamma, ptype).to(device)
    if weight is not None:
        w = weight if w is None else w * weight
    bank_t = timesteps
    if family == FLOW_MATCHING:  # agc_loss takes integer timesteps: the bank's bins
        bank_t = None if bank is None or not isinstance(bank, AGCMemoryBank) else \
            flow_matching_bank_timesteps(timesteps, bank.num_timesteps,
                                         _num_train_timesteps(noise_scheduler))
    return pred, target, w, bank_t


def _check_ranges(checks) -> None:
    """Range checks of several tensors in one host transfer (skipped while compiling)."""
    checks = [c for c in checks if c[1].numel()]
    if not checks or is_compiling():
        return
    values = torch.stack([v for c in checks for v in (c[1].min().double().to(checks[0][1].device),
                                                       c[1].max().double().to(checks[0][1].device))]
                         ).tolist()
    for i, (name, _, low, high, bounds, closed) in enumerate(checks):
        lo, hi = values[2 * i], values[2 * i + 1]
        bad = math.isnan(lo) or math.isnan(hi) or lo < low or (hi > high if closed else hi >= high)
        if bad:
            shown = (lambda v: int(v)) if not closed else (lambda v: v)
            raise ValueError(f"{name} must lie in {bounds}, got values in [{shown(lo)}, {shown(hi)}]")


def diffusion_loss(noise_scheduler: Any, model_pred: Tensor, *, latents: Optional[Tensor] = None,
                   noise: Optional[Tensor] = None, timesteps: Optional[Tensor] = None,
                   snr_gamma: Optional[float] = None, exclude_k: Optional[int] = None,
                   exclude_fraction: Optional[float] = None,
                   bank: Optional[AGCMemoryBank] = None,
                   weight: Optional[Union[float, Tensor]] = None,
                   process_group: Any = None, prediction_type: Optional[str] = None,
                   nonfinite: str = "raise", update_bank: bool = True,
                   sigmas: Optional[Tensor] = None, weighting_scheme: Optional[str] = None,
                   precondition_outputs: bool = False, noisy_latents: Optional[Tensor] = None,
                   ) -> Tuple[Tensor, AGCStats]:
    """Diffusion training loss with optional loss weights and low-loss exclusion.

    ``ℓ_i = w_i · mean_j (model_pred_ij − target_ij)²`` with ``target`` from
    :func:`diffusion_target`, ``w_i = snr_weight_i · weight_i`` (each factor 1 when not
    given), then ``L = Σ m_i ℓ_i / K`` with the keep mask ``m`` of the AGC bank, of
    top-k exclusion or all ones (see :func:`fastsoup.agc_loss`). Computed by the fused
    per-sample kernel in fp32 whatever the input dtypes: no ``.float()`` copies needed.

    Supported schedulers: DDPM-family (``.alphas_cumprod``; prediction types epsilon,
    v_prediction, sample; ``snr_gamma``) and flow matching (``FlowMatchEulerDiscreteScheduler``,
    SD3/Flux: target ``noise − latents``, ``weighting_scheme`` and
    ``precondition_outputs`` as in diffusers' scripts, continuous ``timesteps`` binned onto
    the bank by :func:`flow_matching_bank_timesteps`). Other schedulers raise ``TypeError``.

    Args:
        noise_scheduler: diffusers scheduler (``config.prediction_type``,
            ``alphas_cumprod``, optionally ``get_velocity``), or a ``FlowMatch*`` scheduler.
        model_pred: the network output, ``[B, ...]`` float16/bfloat16/float32 (for a
            diffusers model, ``unet(...).sample``).
        latents, noise: ``x_0`` and ``ε`` of the batch, same shape as ``model_pred``.
        timesteps: ``[B]`` tensor, integer for DDPM-family schedulers, float (``1000·σ``,
            the scheduler's ``timesteps``) for flow matching; needed for ``v_prediction``,
            ``snr_gamma`` and ``bank``.
        snr_gamma: min-SNR-γ (``None``: no SNR weighting; DDPM-family only).
        exclude_k / exclude_fraction: top-k exclusion of the lowest losses.
        bank: an :class:`fastsoup.AGCMemoryBank` (the reference AGC rule; fed the
            unweighted MSE and updated in place unless ``update_bank=False``).
        weight: extra per-sample weight (number or ``[B]`` float tensor), e.g. the
            Diff-Tuning ``DiffTuningBatch.mean_weights``.
        process_group: ``torch.distributed`` group (or ``True``) for global selection;
            every argument check is agreed across ranks (all raise in the same step).
        prediction_type: overrides the scheduler's ``config.prediction_type``.
        nonfinite: ``"raise"`` or ``"exclude"`` (see :func:`fastsoup.agc_loss`).
        sigmas: flow matching: each sample's ``σ`` (``[B]`` or ``[B, 1, ..., 1]``, as the
            scripts' ``get_sigmas`` returns); default ``timesteps / num_train_timesteps``.
        weighting_scheme: flow matching: ``"none"`` (default), ``"sigma_sqrt"``,
            ``"cosmap"``, ``"logit_normal"``, ``"mode"`` (weights of
            ``compute_loss_weighting_for_sd3``).
        precondition_outputs, noisy_latents: flow matching: the SD3 scripts'
            ``--precondition_outputs`` (``model_pred·(−σ) + noisy_latents`` against
            ``latents``).

    Host syncs: two per call (one transfer for every range check of ``timesteps`` and
    ``sigmas``, one in :func:`fastsoup.agc_loss`), plus the agreement header under
    ``process_group``. Under ``torch.compile`` the data-dependent checks are skipped and
    the loss compiles in one graph.

    Returns:
        ``(loss, stats)``: 0-d float32 loss and :class:`fastsoup.AGCStats`.
    """
    args = (noise_scheduler, model_pred, latents, noise, timesteps, sigmas, snr_gamma,
            weighting_scheme, precondition_outputs, noisy_latents, bank, weight,
            prediction_type)
    if process_group is None:
        pred, target, w, bank_t = _prepare(*args)
    else:
        try:
            pred, target, w, bank_t = _prepare(*args)
        except (TypeError, ValueError) as exc:
            # the other ranks are about to enter agc_loss's collective: tell them
            fail_on_every_rank(process_group, exc, model_pred, op="diffusion_loss")
    return agc_loss(pred, target, timesteps=bank_t, bank=bank, exclude_k=exclude_k,
                    exclude_fraction=exclude_fraction, weight=w, process_group=process_group,
                    nonfinite=nonfinite, update_bank=update_bank)
