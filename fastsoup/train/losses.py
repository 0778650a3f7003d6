"""The diffusion training loss from what a diffusers training script has at hand.

:func:`diffusion_loss` takes the scheduler, the network output and the ``latents`` /
``noise`` / ``timesteps`` of the batch and returns ``(loss, stats)``:

1. the regression target by ``noise_scheduler.config.prediction_type``
   (:func:`diffusion_target`): ``"epsilon"`` → ``noise``; ``"v_prediction"`` →
   ``noise_scheduler.get_velocity(latents, noise, timesteps)`` (or ``α_t ε − σ_t x_0``
   from ``alphas_cumprod`` when the scheduler has no ``get_velocity``); ``"sample"`` →
   ``latents``;
2. optional min-SNR-γ weights (:func:`fastsoup.train.schedulers.min_snr_loss_weights`),
   computed exactly as diffusers' ``train_text_to_image.py`` does;
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
from .schedulers import (FLOW_MATCHING, SNR_FLOW_MESSAGE, WEIGHTING_SCHEMES,
                         check_ddpm_timesteps, check_flow_timesteps, check_snr_gamma,
                         flow_matching_bank_timesteps, flow_matching_loss_weights, flow_sigmas,
                         min_snr_weights, num_train_timesteps, prediction_type_of,
                         scheduler_family)

__all__ = ["diffusion_target", "diffusion_loss"]

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
        check_ddpm_timesteps(timesteps, latents.shape[0], ac.numel())
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
            raise ValueError(SNR_FLOW_MESSAGE)
        num = num_train_timesteps(noise_scheduler)
        if timesteps is not None:
            check_flow_timesteps(timesteps, batch)
            range_checks.append(("timesteps", timesteps, 0, num,
                                 f"[0, {num}] (flow matching: t = {num}·σ)", True))
        scheme = "none" if weighting_scheme is None else weighting_scheme
        if scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got "
                             f"{weighting_scheme!r}")
        need_sigma = scheme in ("sigma_sqrt", "cosmap") or precondition_outputs
        sig = None
        if need_sigma or sigmas is not None:
            sig = flow_sigmas(sigmas, timesteps, batch, num, device)
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
            snr_gamma = check_snr_gamma(snr_gamma)
    check_same_shape("model_pred", model_pred, "target", target)
    if weight is not None:
        _check_weight(weight, batch, device)
    _check_ranges(range_checks)
    if family != FLOW_MATCHING and snr_gamma is not None:
        ac = scheduler_alphas_cumprod(noise_scheduler)
        w = min_snr_weights(ac, timesteps, snr_gamma, ptype).to(device)
    if weight is not None:
        w = weight if w is None else w * weight
    bank_t = timesteps
    if family == FLOW_MATCHING:  # agc_loss takes integer timesteps: the bank's bins
        bank_t = None if bank is None or not isinstance(bank, AGCMemoryBank) else \
            flow_matching_bank_timesteps(timesteps, bank.num_timesteps,
                                         num_train_timesteps(noise_scheduler))
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
