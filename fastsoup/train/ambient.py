"""Ambient diffusion in a diffusers training loop: data, batches and sampling (SPEC §3).

Training data are noisy, ``x_n = α_n x_0 + σ_n η`` with ``(α_n, σ_n)`` the scheduler's values
at the data timestep ``t_n`` and **one fixed noise draw** ``η`` per example for the whole run.
The pieces a VP (ε-network, diffusers scheduler) training loop needs:

* :func:`ambient_vp_dataset`: wraps a dataset of clean examples so that each one is
  returned with its fixed noise (a :class:`fastsoup.train.fixed_noise.AmbientDataset` with
  ``α_n, σ_n`` read from the scheduler); :func:`corrupt_batch` does the same for a batch
  already on the GPU (e.g. latents encoded in the loop), given the examples' indices;
* :func:`ambient_vp_batch`: draws ``t ~ U{t_n, …, T−1}`` and the extra noise ``z`` and
  builds the network input ``x_t = a·x_n + b·z`` (``a = α_t/α_n``,
  ``b = sqrt(σ_t² − a²σ_n²)``), returned with every coefficient the loss needs;
* :func:`sample_early_stop`: DDIM / ancestral sampling down to ``t_n``, then one Tweedie
  step ``x̂_0 = (x − σ_{t_n} ε̂)/α_{t_n}`` (how an ambient model is sampled without
  consistency training).

A training step::

    ds = fs.train.ambient_vp_dataset(clean_dataset, noise_scheduler, t_n=100, seed=0)
    ...
    for x_n in loader:
        batch = fs.train.ambient_vp_batch(x_n.to(device), noise_scheduler, t_n=100)
        eps = unet(batch.x_t, batch.timesteps).sample
        loss = batch.loss(eps)      # fs.ambient_loss_vp(eps, batch.extra_noise, α_t, σ_t, α_n, σ_n)
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..ops import (
    ambient_loss_vp, vp_reverse_step_coefficients, vp_reverse_step_from_eps,
)
from ..ops.schedule import schedule_values, vp_alpha_sigma_unchecked
from ..ops._checks import check_float_tensor, check_same_shape
from ._checks import check_timesteps, scheduler_alphas_cumprod
from .fixed_noise import AmbientDataset, FixedNoise

__all__ = [
    "ambient_vp_dataset",
    "corrupt_batch",
    "AmbientVPBatch",
    "ambient_vp_batch",
    "sample_early_stop",
]


def _alphas_cumprod(noise_scheduler: Any) -> Tensor:
    return scheduler_alphas_cumprod(noise_scheduler, tensor_ok=True)


def _check_t_n(t_n: Any, num: int) -> int:
    if isinstance(t_n, Tensor) and t_n.numel() == 1 and not t_n.dtype.is_floating_point:
        t_n = int(t_n)
    if isinstance(t_n, bool) or not isinstance(t_n, int) or not (0 <= t_n < num):
        raise ValueError(f"t_n must be an int in [0, {num - 1}] (the data noise timestep), got {t_n!r}")
    return t_n


def _alpha_sigma_n(schedule: Any, t_n: int) -> Tuple[float, float]:
    """``(α, σ)`` at ``t_n`` as Python floats (float32 values, as vp_alpha_sigma gives),
    computed where ``alphas_cumprod`` lives (on the CPU for diffusers: no device sync)."""
    ac = _alphas_cumprod(schedule)
    t_n = _check_t_n(t_n, ac.numel())
    abar = schedule_values(ac)[t_n]  # a Python float64, cached: no tensor read per call
    # float64 square roots rounded once to float32: the values vp_alpha_sigma gives
    return float(np.float32(math.sqrt(abar))), float(np.float32(math.sqrt(max(1.0 - abar, 0.0))))


# ----------------------------------------------------------------------------- data
def ambient_vp_dataset(dataset, noise_scheduler: Any, t_n: int, *, seed: int = 0,
                       key: Optional[Union[int, str]] = None,
                       cache_dir: Optional[Union[str, os.PathLike]] = None,
                       noise: Optional[FixedNoise] = None) -> AmbientDataset:
    """Wrap a dataset of clean examples into fixed-noise VP data at timestep ``t_n``.

    ``result[i] = α_n x_0[i] + σ_n η_i`` with ``α_n = sqrt(ᾱ_{t_n})``, ``σ_n = sqrt(1 − ᾱ_{t_n})``
    from the scheduler and ``η_i`` a pure function of ``(seed, i)`` (the same every epoch,
    in every DataLoader worker and on every rank; cached in memory and, with
    ``cache_dir``, on disk). See :class:`fastsoup.train.fixed_noise.AmbientDataset` for ``key``
    (where the image sits in an example) and the caching rules.

    Apply it to the exact tensor the model trains on (pixels in ``[-1, 1]`` for a pixel
    model) and before any random augmentation. For a latent model whose latents are
    computed in the loop, use :func:`corrupt_batch` on deterministic latents instead.
    """
    alpha_n, sigma_n = _alpha_sigma_n(noise_scheduler, t_n)
    return AmbientDataset(dataset, sigma_n=sigma_n, alpha_n=alpha_n, seed=seed, key=key,
                          cache_dir=cache_dir, noise=noise)


def corrupt_batch(x0: Tensor, indices: Union[Tensor, Sequence[int]], noise: FixedNoise,
                  alpha_n: float, sigma_n: float) -> Tensor:
    """``x_n = α_n x_0 + σ_n η_{indices}`` for a batch, with each example's fixed noise.

    Args:
        x0: clean batch ``[B, ...]`` float tensor on any device (e.g. latents just encoded
            by the VAE; they must be the same every epoch for the example, e.g.
            ``latent_dist.mean`` or cached samples, or the clean signal leaks).
        indices: the ``B`` dataset indices of the examples (int tensor or sequence).
        noise: the run's :class:`fastsoup.train.fixed_noise.FixedNoise`.
        alpha_n, sigma_n: numbers, e.g. from :func:`fastsoup.vp_alpha_sigma` at ``t_n``.

    Returns:
        ``x_n`` with the dtype and device of ``x0`` (computed in float32). Equals the
        stacked items of :func:`ambient_vp_dataset` with the same noise.
    """
    check_float_tensor("x0", x0)
    if not isinstance(noise, FixedNoise):
        raise TypeError(f"noise must be a fastsoup.train.fixed_noise.FixedNoise, got {type(noise).__name__}")
    idx = indices.tolist() if isinstance(indices, Tensor) else list(indices)
    if len(idx) != x0.shape[0]:
        raise ValueError(f"indices has {len(idx)} entries for a batch of B={x0.shape[0]}")
    eta = noise.batch(idx, x0.shape[1:], device=x0.device).to(torch.float32)
    return (float(alpha_n) * x0.float() + float(sigma_n) * eta).to(x0.dtype)


# ----------------------------------------------------------------------------- batches
class AmbientVPBatch(NamedTuple):
    """Inputs of one ambient VP training step (see :func:`ambient_vp_batch`).

    Attributes:
        x_t: network input ``a·x_n + b·z``, ``[B, ...]``, dtype of ``x_n``.
        extra_noise: ``z ~ N(0, I)``, ``[B, ...]``, dtype of ``x_n``.
        alpha_t, sigma_t: float32 ``[B]``, ``sqrt(ᾱ_t)``, ``sqrt(1 − ᾱ_t)``.
        alpha_n, sigma_n: float32 ``[B]``, the same at ``t_n``.
        timesteps: int64 ``[B]`` in ``[t_n, T)``; pass to the network.
    """

    x_t: Tensor
    extra_noise: Tensor
    alpha_t: Tensor
    sigma_t: Tensor
    alpha_n: Tensor
    sigma_n: Tensor
    timesteps: Tensor

    def loss(self, eps_pred: Tensor, mode: str = "x0", weight=None, reduction: str = "mean") -> Tensor:
        """:func:`fastsoup.ambient_loss_vp` on this batch (``mode``: ``"x0"`` or ``"eps"``)."""
        return ambient_loss_vp(eps_pred, self.extra_noise, self.alpha_t, self.sigma_t,
                               self.alpha_n, self.sigma_n, mode=mode, weight=weight,
                               reduction=reduction)


def _draw_noise(shape, generator: Optional[torch.Generator], device) -> Tensor:
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    return torch.randn(shape, generator=generator, device=generator.device,
                       dtype=torch.float32).to(device)


@torch.no_grad()
def ambient_vp_batch(x_n: Tensor, noise_scheduler: Any, t_n: int, *,
                     generator: Optional[torch.Generator] = None,
                     timesteps: Optional[Tensor] = None, extra_noise: Optional[Tensor] = None,
                     max_timestep: Optional[int] = None) -> AmbientVPBatch:
    """Draw ``t ~ U{t_n, …, t_max}`` and ``z``, and form ``x_t`` from noisy data ``x_n``.

    With ``a = α_t/α_n`` and ``b = sqrt(max(σ_t² − a²σ_n², 0))`` (float64, from the same
    float32 ``α, σ`` the loss receives, so input and loss agree exactly),
    ``x_t = a·x_n + b·z`` has the marginal of the clean forward process at ``t``
    (``a²σ_n² + b² = σ_t²``). At ``t = t_n``, ``b = 0`` and ``x_t = x_n``.

    Args:
        x_n: noisy data ``[B, ...]`` float tensor (from :func:`ambient_vp_dataset`).
        noise_scheduler: a scheduler with ``.alphas_cumprod`` (``[T]``), or that tensor.
        t_n: the data's timestep.
        generator: ``torch.Generator`` for ``t`` and ``z`` (drawn on its device, then moved
            to ``x_n``'s device); the global RNG of ``x_n``'s device when ``None``.
        timesteps: optional integer ``[B]`` timesteps to use instead of drawing them
            (each in ``[t_n, T)``).
        extra_noise: optional ``z`` to use instead of drawing it (shape of ``x_n``).
        max_timestep: ``t_max`` (default ``T − 1``).

    Returns:
        :class:`AmbientVPBatch`; ``batch.loss(eps_pred)`` is the ambient loss.
    """
    check_float_tensor("x_n", x_n)
    B, device = x_n.shape[0], x_n.device
    ac = _alphas_cumprod(noise_scheduler)
    T = ac.numel()
    t_n = _check_t_n(t_n, T)
    t_max = T - 1 if max_timestep is None else max_timestep
    if isinstance(t_max, bool) or not isinstance(t_max, int) or not (t_n <= t_max < T):
        raise ValueError(f"max_timestep must be an int in [t_n={t_n}, {T - 1}], got {max_timestep!r}")
    if timesteps is None:
        if generator is None:
            timesteps = torch.randint(t_n, t_max + 1, (B,), device=device)
        else:
            timesteps = torch.randint(t_n, t_max + 1, (B,), generator=generator,
                                      device=generator.device).to(device)
    else:
        check_timesteps(timesteps, batch=B, low=t_n, high=T, bounds=f"[t_n={t_n}, {T - 1}]")
        timesteps = timesteps.to(device)
    timesteps = timesteps.long()
    if extra_noise is None:
        z = _draw_noise(x_n.shape, generator, device).to(x_n.dtype)
    else:
        check_float_tensor("extra_noise", extra_noise)
        check_same_shape("x_n", x_n, "extra_noise", extra_noise)
        z = extra_noise
    # no host sync: drawn timesteps are in range (given ones were checked above, in one
    # transfer), the schedule is cached on the device, and (α_n, σ_n) are host numbers
    alpha_t, sigma_t = vp_alpha_sigma_unchecked(ac, timesteps)
    a_n, s_n = _alpha_sigma_n(ac, t_n)
    alpha_n = torch.full((B,), a_n, dtype=torch.float32, device=device)
    sigma_n = torch.full((B,), s_n, dtype=torch.float32, device=device)
    # the loss op's arithmetic: float64 from the float32 schedule values it receives
    a = alpha_t.double() / alpha_n.double()
    b = (sigma_t.double() ** 2 - a * a * sigma_n.double() ** 2).clamp_min(0).sqrt()
    shape = (B,) + (1,) * (x_n.dim() - 1)
    x_t = (a.float().view(shape) * x_n.float() + b.float().view(shape) * z.float()).to(x_n.dtype)
    return AmbientVPBatch(x_t, z, alpha_t, sigma_t, alpha_n, sigma_n, timesteps)


# ----------------------------------------------------------------------------- sampling
def _model_eps(model: Callable, x: Tensor, t: int) -> Tensor:
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    out = model(x, tt)
    if hasattr(out, "sample") and not isinstance(out, Tensor):
        out = out.sample                      # diffusers model output
    elif isinstance(out, (tuple, list)):
        out = out[0]                          # return_dict=False
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise ValueError(f"model(x, t) must return ε̂ with the shape of x {tuple(x.shape)}, got "
                         f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
    return out


def _timestep_list(timesteps: Any, T: int) -> list:
    if isinstance(timesteps, Tensor):
        if timesteps.dtype.is_floating_point or timesteps.dim() != 1:
            raise TypeError("timesteps must be a 1-d integer tensor or a sequence of ints")
        ts = [int(t) for t in timesteps.tolist()]
    else:
        ts = list(timesteps)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ts):
            raise TypeError("timesteps must be a 1-d integer tensor or a sequence of ints")
    if not ts:
        raise ValueError("timesteps is empty")
    if any(not (0 <= t < T) for t in ts):
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {min(ts)} … {max(ts)}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError("timesteps must be strictly decreasing (from the noisiest level down)")
    return ts


@torch.no_grad()
def sample_early_stop(model: Callable[[Tensor, Tensor], Any], x: Tensor, noise_scheduler: Any,
                      timesteps: Union[Tensor, Sequence[int]], t_n: int, *, eta: float = 0.0,
                      generator: Optional[torch.Generator] = None, return_x_tn: bool = False,
                      clip_sample: Optional[float] = None,
                      ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Sample an ambient model: reverse steps down to ``t_n``, then one Tweedie step.

    Starting from ``x`` at level ``timesteps[0]``, steps ``t → s`` through every entry of
    ``timesteps`` above ``t_n`` and then to ``t_n`` itself (added when absent), each

        ``x̂_0 = (x − σ_t ε̂)/α_t``,  ``x_s = α_s x̂_0 + sqrt(σ_s² − c²) ε̂ + c ξ``,

    with ``c = η·(σ_s/σ_t)·sqrt(1 − ᾱ_t/ᾱ_s)`` (``η = 0``: DDIM, deterministic;
    ``η = 1``: DDPM ancestral, through the fused :func:`fastsoup.vp_reverse_step_from_eps`).
    At ``t_n`` it returns ``x̂_0 = (x_{t_n} − σ_{t_n} ε̂(x_{t_n}, t_n))/α_{t_n}``: below the
    data noise level the model has learned nothing, so sampling stops there. The network
    is never evaluated at a timestep below ``t_n``.

    Args:
        model: ``model(x, t) -> ε̂`` with ``t`` an int64 ``[B]`` tensor; a diffusers model
            output (``.sample``) or tuple is accepted (e.g. ``model=unet`` directly).
        x: the starting sample at ``timesteps[0]``, ``[B, ...]`` float tensor (e.g.
            ``torch.randn`` for ``timesteps[0] = T − 1``).
        noise_scheduler: a scheduler with ``.alphas_cumprod``, or that ``[T]`` tensor.
        timesteps: strictly decreasing ints with ``timesteps[0] ≥ t_n`` (e.g. a diffusers
            scheduler's ``.timesteps`` after ``set_timesteps``).
        t_n: the data's noise timestep (``0`` gives an ordinary sampler ending with the
            Tweedie estimate at ``t = 0``).
        eta: ``η`` in ``[0, 1]``.
        generator: ``torch.Generator`` for ``ξ`` (drawn on its device, then moved).
        return_x_tn: also return ``x_{t_n}``.
        clip_sample: clamp every ``x̂_0`` to ``[−clip_sample, clip_sample]`` (and re-derive
            ``ε̂`` from the clamped value, as diffusers' ``clip_sample`` does); ``None``
            (default) leaves it unclamped. Useful for short or early training runs.

    Returns:
        ``x̂_0`` (dtype and device of ``x``), or ``(x̂_0, x_{t_n})`` with ``return_x_tn``.
    """
    check_float_tensor("x", x)
    ac = _alphas_cumprod(noise_scheduler)
    T = ac.numel()
    t_n = _check_t_n(t_n, T)
    ts = _timestep_list(timesteps, T)
    if ts[0] < t_n:
        raise ValueError(f"timesteps[0]={ts[0]} is below t_n={t_n}: x must start at or above "
                         "the data noise level")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if clip_sample is not None and not (float(clip_sample) > 0):
        raise ValueError(f"clip_sample must be a positive number or None, got {clip_sample!r}")
    path = [t for t in ts if t > t_n] + [t_n]
    acd = ac.to(dtype=torch.float64, device="cpu")
    alpha = acd.sqrt()
    sigma = (1.0 - acd).clamp_min(0).sqrt()
    dtype, device = x.dtype, x.device
    x = x.float()
    for t, s in zip(path[:-1], path[1:]):
        eps = _model_eps(model, x.to(dtype), t).float()
        a_t, s_t, a_s, s_s = (float(v) for v in (alpha[t], sigma[t], alpha[s], sigma[s]))
        if clip_sample is not None and s_t > 0:
            x0 = ((x - s_t * eps) / a_t).clamp_(-float(clip_sample), float(clip_sample))
            eps = (x - a_t * x0) / s_t
        if eta == 0:
            x0 = (x - s_t * eps) / a_t
            x = a_s * x0 + s_s * eps
            continue
        c = vp_reverse_step_coefficients(acd, t, s)
        c_f = float(eta) * float(c.c_f[0])
        c_o = max(s_s ** 2 - c_f ** 2, 0.0) ** 0.5
        xi = _draw_noise(x.shape, generator, device)
        x = vp_reverse_step_from_eps(x, eps, xi, a_t, s_t, a_s, c_o, c_f)
    eps = _model_eps(model, x.to(dtype), t_n).float()
    x0 = (x - float(sigma[t_n]) * eps) / float(alpha[t_n])
    if clip_sample is not None:
        x0 = x0.clamp_(-float(clip_sample), float(clip_sample))
    x0 = x0.to(dtype)
    return (x0, x.to(dtype)) if return_x_tn else x0
