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
``DDIMScheduler``, ...). This module never imports diffusers.

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
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from ..ops._checks import check_float_tensor, check_same_shape
from ..ops.agc import AGCMemoryBank, AGCStats, agc_loss
from ._checks import check_timesteps, scheduler_alphas_cumprod

__all__ = [
    "PREDICTION_TYPES",
    "prediction_type_of",
    "compute_snr",
    "min_snr_loss_weights",
    "diffusion_target",
    "diffusion_loss",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ----------------------------------------------------------------------------- helpers
def prediction_type_of(noise_scheduler: Any, prediction_type: Optional[str] = None) -> str:
    """The prediction type to train with: ``prediction_type`` if given, else the
    scheduler's ``config.prediction_type``. Raises ``ValueError`` for unknown types."""
    if prediction_type is None:
        config = getattr(noise_scheduler, "config", None)
        prediction_type = getattr(config, "prediction_type", None)
        if prediction_type is None and isinstance(config, dict):
            prediction_type = config.get("prediction_type")
        if prediction_type is None:
            raise ValueError(
                "noise_scheduler has no config.prediction_type: pass prediction_type= "
                f"(one of {PREDICTION_TYPES})")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: fastsoup supports "
                         f"{PREDICTION_TYPES}")
    return prediction_type


def _check_timesteps(timesteps: Any, batch: Optional[int], num: Optional[int]) -> Tensor:
    return check_timesteps(timesteps, batch=batch, high=num,
                           bounds=f"[0, {num}) (the scheduler's alphas_cumprod has {num} entries)")


# ----------------------------------------------------------------------------- SNR
def compute_snr(noise_scheduler: Any, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio ``SNR(t) = (α_t/σ_t)² = ᾱ_t/(1 − ᾱ_t)`` per sample.

    The same arithmetic as ``diffusers.training_utils.compute_snr`` (square roots in the
    dtype of ``alphas_cumprod``, then float32), so the values match it bit for bit.

    Args:
        noise_scheduler: anything with ``.alphas_cumprod`` (``[T]`` float tensor).
        timesteps: integer ``[B]`` tensor with values in ``[0, T)``.

    Returns:
        float32 ``[B]`` on the device of ``timesteps`` (``inf`` where ``ᾱ_t = 1``, ``0``
        where ``ᾱ_t = 0``).
    """
    ac = scheduler_alphas_cumprod(noise_scheduler)
    t = _check_timesteps(timesteps, None, ac.numel())
    alpha = (ac ** 0.5).to(device=t.device)[t].float()
    sigma = ((1.0 - ac) ** 0.5).to(device=t.device)[t].float()
    return (alpha / sigma) ** 2


def min_snr_loss_weights(noise_scheduler: Any, timesteps: Tensor, snr_gamma: float,
                         prediction_type: Optional[str] = None) -> Tensor:
    """Min-SNR-γ per-sample loss weights (Hang et al. 2023), as diffusers computes them.

    ``w = min(SNR, γ) / SNR`` for ``"epsilon"``, ``min(SNR, γ) / (SNR + 1)`` for
    ``"v_prediction"`` and ``min(SNR, γ)`` for ``"sample"`` (the paper's x0 weight; the
    diffusers scripts leave the weight undivided for other types). Where ``SNR = 0``
    (zero-terminal-SNR schedules) the ε weight is its limit ``1`` instead of diffusers'
    ``0/0 = NaN``.

    Args:
        noise_scheduler: scheduler with ``.alphas_cumprod`` (and ``.config.prediction_type``
            unless ``prediction_type`` is given).
        timesteps: integer ``[B]`` tensor.
        snr_gamma: ``γ > 0`` (5.0 in the paper).

    Returns:
        float32 ``[B]`` weights on the device of ``timesteps``.
    """
    if isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float)) or not (snr_gamma > 0):
        raise ValueError(f"snr_gamma must be a positive number, got {snr_gamma!r}")
    snr_gamma = float(snr_gamma)
    ptype = prediction_type_of(noise_scheduler, prediction_type)
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if ptype == "epsilon":
        weights = torch.where(snr > 0, weights / snr, torch.ones_like(weights))
    elif ptype == "v_prediction":
        weights = weights / (snr + 1)
    return weights.float()


# ----------------------------------------------------------------------------- target
def diffusion_target(noise_scheduler: Any, *, latents: Optional[Tensor] = None,
                     noise: Optional[Tensor] = None, timesteps: Optional[Tensor] = None,
                     prediction_type: Optional[str] = None) -> Tensor:
    """The regression target of the network for the scheduler's prediction type.

    * ``"epsilon"``: ``noise`` (needs ``noise``);
    * ``"v_prediction"``: ``v = α_t ε − σ_t x_0`` (needs all three): the scheduler's own
      ``get_velocity(latents, noise, timesteps)`` when it has one, else computed here from
      ``alphas_cumprod`` in float32 and cast to the dtype of ``latents``;
    * ``"sample"``: ``latents`` (needs ``latents``).

    Args:
        latents: clean ``x_0``, ``[B, ...]`` float tensor.
        noise: ``ε``, same shape.
        timesteps: integer ``[B]`` tensor in ``[0, T)``.
        prediction_type: overrides ``noise_scheduler.config.prediction_type`` (like the
            ``--prediction_type`` flag of the diffusers scripts, without mutating the
            scheduler's config).
    """
    ptype = prediction_type_of(noise_scheduler, prediction_type)
    need = {"epsilon": ("noise",), "v_prediction": ("latents", "noise", "timesteps"),
            "sample": ("latents",)}[ptype]
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
    ac = scheduler_alphas_cumprod(noise_scheduler)
    _check_timesteps(timesteps, latents.shape[0], ac.numel())
    get_velocity = getattr(noise_scheduler, "get_velocity", None)
    if callable(get_velocity):
        return get_velocity(latents, noise, timesteps)
    acf = ac.to(device=latents.device, dtype=torch.float32)[timesteps.to(latents.device)]
    shape = (latents.shape[0],) + (1,) * (latents.dim() - 1)
    a = acf.sqrt().view(shape)
    s = (1.0 - acf).clamp_min(0).sqrt().view(shape)
    return (a * noise.float() - s * latents.float()).to(latents.dtype)


# ----------------------------------------------------------------------------- loss
def diffusion_loss(noise_scheduler: Any, model_pred: Tensor, *, latents: Optional[Tensor] = None,
                   noise: Optional[Tensor] = None, timesteps: Optional[Tensor] = None,
                   snr_gamma: Optional[float] = None, exclude_k: Optional[int] = None,
                   exclude_fraction: Optional[float] = None,
                   bank: Optional[AGCMemoryBank] = None,
                   weight: Optional[Union[float, Tensor]] = None,
                   process_group: Any = None, prediction_type: Optional[str] = None,
                   nonfinite: str = "raise", update_bank: bool = True,
                   ) -> Tuple[Tensor, AGCStats]:
    """Diffusion training loss with optional min-SNR-γ weights and low-loss exclusion.

    ``ℓ_i = w_i · mean_j (model_pred_ij − target_ij)²`` with ``target`` from
    :func:`diffusion_target`, ``w_i = snr_weight_i · weight_i`` (each factor 1 when not
    given), then ``L = Σ m_i ℓ_i / K`` with the keep mask ``m`` of the AGC bank, of
    top-k exclusion or all ones (see :func:`fastsoup.agc_loss`). Computed by the fused
    per-sample kernel in fp32 whatever the input dtypes: no ``.float()`` copies needed.

    Args:
        noise_scheduler: diffusers-style scheduler (``config.prediction_type``,
            ``alphas_cumprod``, optionally ``get_velocity``).
        model_pred: the network output, ``[B, ...]`` float16/bfloat16/float32 (for a
            diffusers model, ``unet(...).sample``).
        latents, noise: ``x_0`` and ``ε`` of the batch, same shape as ``model_pred``.
        timesteps: integer ``[B]`` tensor; needed for ``v_prediction``, ``snr_gamma`` and
            ``bank``.
        snr_gamma: min-SNR-γ (``None``: no SNR weighting).
        exclude_k / exclude_fraction: top-k exclusion of the lowest losses.
        bank: an :class:`fastsoup.AGCMemoryBank` (the reference AGC rule; fed the
            unweighted MSE and updated in place unless ``update_bank=False``).
        weight: extra per-sample weight (number or ``[B]`` float tensor), e.g. the
            Diff-Tuning ``DiffTuningBatch.mean_weights``.
        process_group: ``torch.distributed`` group (or ``True``) for global selection.
        prediction_type: overrides the scheduler's ``config.prediction_type``.
        nonfinite: ``"raise"`` or ``"exclude"`` (see :func:`fastsoup.agc_loss`).

    Returns:
        ``(loss, stats)``: 0-d float32 loss and :class:`fastsoup.AGCStats`.
    """
    check_float_tensor("model_pred", model_pred)
    ptype = prediction_type_of(noise_scheduler, prediction_type)
    if model_pred.shape[0] == 0:
        raise ValueError("model_pred has an empty batch (B = 0)")
    target = diffusion_target(noise_scheduler, latents=latents, noise=noise, timesteps=timesteps,
                              prediction_type=ptype)
    check_same_shape("model_pred", model_pred, "target", target)
    batch = model_pred.shape[0]
    if timesteps is not None:
        num = (scheduler_alphas_cumprod(noise_scheduler).numel()
               if getattr(noise_scheduler, "alphas_cumprod", None) is not None else None)
        _check_timesteps(timesteps, batch, num)
    w = None
    if snr_gamma is not None:
        if timesteps is None:
            raise ValueError("snr_gamma= needs timesteps= (one integer timestep per sample)")
        w = min_snr_loss_weights(noise_scheduler, timesteps, snr_gamma, ptype).to(model_pred.device)
    if weight is not None:
        if isinstance(weight, Tensor):
            if not weight.dtype.is_floating_point:
                raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
            if weight.dim() not in (0, 1) or (weight.dim() == 1 and weight.shape[0] != batch):
                raise ValueError(f"weight must be a number or have shape [B] = [{batch}], "
                                 f"got {tuple(weight.shape)}")
            if weight.device != model_pred.device:
                raise ValueError(f"weight is on {weight.device} but model_pred is on {model_pred.device}")
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weight must be a number or a [B] float tensor, got {type(weight).__name__}")
        w = weight if w is None else w * weight
    return agc_loss(model_pred, target, timesteps=timesteps, bank=bank, exclude_k=exclude_k,
                    exclude_fraction=exclude_fraction, weight=w, process_group=process_group,
                    nonfinite=nonfinite, update_bank=update_bank)
