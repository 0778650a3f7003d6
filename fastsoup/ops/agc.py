"""Low-loss exclusion ("anti-gradient control", SPEC §1).

Memorised training images reach unusually low loss; AGC removes the lowest-loss samples
of each batch from the gradient (zero gradient, never gradient ascent). Three rules act
on the detached ``[B]`` loss vector:

* top-k: drop the ``k`` lowest losses (or ``floor(fraction·B)``), ties broken by batch
  index (lower index dropped first): :func:`low_loss_keep_mask`;
* the AGC memory bank of the reference code: :class:`AGCMemoryBank`;
* none: every sample kept.

:func:`agc_loss` combines the fused per-sample loss, a rule and the reduction
``L = Σ m_i ℓ_i / K`` (``L = 0`` with zero gradients when ``K = 0``), optionally across
data-parallel ranks.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import as_weight, check_float_tensor, check_same_shape
from .mse import per_sample_mse


class NonFiniteLossError(FloatingPointError, ValueError):
    """Raised when per-sample losses contain NaN or infinity."""


# ---------------------------------------------------------------------------- top-k rule
def _num_excluded(batch: int, k: Optional[int], fraction: Optional[float]) -> int:
    if k is not None and fraction is not None:
        raise ValueError("give either k or fraction, not both")
    if k is not None:
        if isinstance(k, bool):
            raise TypeError("k must be an int, got bool")
        try:
            k = operator.index(k)  # int, numpy integers, 0-d integer tensors
        except TypeError:
            raise TypeError(f"k must be an int, got {type(k).__name__}") from None
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if batch > 0 and k >= batch:
            raise ValueError(
                f"k={k} would exclude the whole batch of B={batch} samples (need k < B)"
            )
        return k
    if fraction is not None:
        fraction = float(fraction)
        if not (0.0 <= fraction < 1.0) or math.isnan(fraction):
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        # floor(fraction·B), robust to binary rounding (0.29·100 is 28.999…98 in floats)
        return int(math.floor(fraction * batch + 1e-9))
    return 0


def low_loss_keep_mask(losses: Tensor, k: Optional[int] = None,
                       fraction: Optional[float] = None) -> Tensor:
    """Boolean ``[B]`` mask keeping all but the ``k`` lowest losses.

    Ties are broken by batch index: among equal losses the lower index is dropped first,
    so the result is deterministic (``torch.topk`` gives no such guarantee). Pass ``k`` or
    ``fraction`` (drop ``floor(fraction·B)``); with neither, every sample is kept.
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(f"losses must have shape [B], got {tuple(losses.shape)}")
    if not losses.dtype.is_floating_point:
        raise TypeError(f"losses must be a floating tensor, got {losses.dtype}")
    batch = losses.shape[0]
    n_drop = _num_excluded(batch, k, fraction)
    keep = torch.ones(batch, dtype=torch.bool, device=losses.device)
    if n_drop == 0:
        return keep
    if torch.isnan(losses).any():
        raise NonFiniteLossError("losses contain NaN: cannot rank them")
    order = torch.sort(losses.detach(), stable=True).indices  # ties keep index order
    keep[order[:n_drop]] = False
    return keep


# ---------------------------------------------------------------------------- AGC bank
def _rank_within_timestep(timesteps: Tensor) -> Tensor:
    """For each sample, how many earlier samples of the batch share its timestep."""
    n = timesteps.shape[0]
    order = torch.sort(timesteps, stable=True).indices
    sorted_t = timesteps[order]
    pos = torch.arange(n, device=timesteps.device)
    is_start = torch.ones(n, dtype=torch.bool, device=timesteps.device)
    is_start[1:] = sorted_t[1:] != sorted_t[:-1]
    group_start = torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), dim=0).values
    rank = torch.empty_like(pos)
    rank[order] = pos - group_start
    return rank


class AGCMemoryBank(torch.nn.Module):
    """Per-timestep running loss bank of anti-gradient control (the reference rule).

    ``bank[t]`` starts at zero. A sample with loss ``ℓ`` at timestep ``t`` is kept iff
    ``ratio·ℓ ≥ bank[t]``, reading the bank *before* this batch updates it (ties kept).
    Then, in batch order, ``bank[t] ← decay·bank[t] + (1 − decay)·ℓ``. Samples sharing a
    timestep update one after another; the vectorised update processes them in rounds
    (the r-th occurrence of every timestep at once), which reproduces the sequential loop
    bit for bit, deterministically, on any device.

    The bank is a registered buffer: it follows ``.to(device)`` and is saved by
    ``state_dict()``. It belongs to one model; keep one per shard in ensemble training.
    """

    def __init__(self, num_timesteps: int = 1000, ratio: float = 2.0, decay: float = 0.8,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, numbers.Integral):
            raise TypeError(f"num_timesteps must be an int, got {num_timesteps!r}")
        if num_timesteps <= 0:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
        if not (0 < ratio < math.inf):
            raise ValueError(f"ratio must be positive and finite, got {ratio}")
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_timesteps = int(num_timesteps)
        self.ratio = float(ratio)
        self.decay = float(decay)
        self.register_buffer("bank", torch.zeros(num_timesteps, dtype=dtype, device=device))
        self.register_buffer("count", torch.zeros(num_timesteps, dtype=torch.int64, device=device))

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, ratio={self.ratio}, decay={self.decay}"

    def _check(self, losses: Tensor, timesteps: Tensor) -> Tuple[Tensor, Tensor]:
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise ValueError("losses must be a [B] tensor")
        if not losses.dtype.is_floating_point:
            raise TypeError(f"losses must be a floating tensor, got {losses.dtype}")
        if not isinstance(timesteps, Tensor):
            raise TypeError(f"timesteps must be a torch.Tensor, got {type(timesteps).__name__}")
        if timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool or timesteps.is_complex():
            raise TypeError(f"timesteps must be an integer tensor, got {timesteps.dtype}")
        if timesteps.dim() != 1 or timesteps.shape[0] != losses.shape[0]:
            raise ValueError(
                f"timesteps must have shape [B] = [{losses.shape[0]}], got {tuple(timesteps.shape)}"
            )
        timesteps = timesteps.to(self.bank.device)
        losses = losses.detach().to(device=self.bank.device, dtype=self.bank.dtype)
        if timesteps.numel():
            # one device sync for all three checks
            finite, lo, hi = torch.stack([torch.isfinite(losses).all().to(torch.int64),
                                          timesteps.min().long(), timesteps.max().long()]).tolist()
            if lo < 0 or hi >= self.num_timesteps:
                raise ValueError(
                    f"timesteps must lie in [0, {self.num_timesteps}) for this bank, "
                    f"got values in [{lo}, {hi}]"
                )
            if not finite:
                raise NonFiniteLossError(
                    "losses contain NaN or infinity: they would poison the bank for their "
                    "timesteps (drop them first; agc_loss(nonfinite='exclude') does)"
                )
        return losses, timesteps.long()

    @torch.no_grad()
    def keep_mask(self, losses: Tensor, timesteps: Tensor) -> Tensor:
        """Boolean ``[B]``: ``ratio·ℓ_i ≥ bank[t_i]`` with the current (pre-update) bank."""
        l, t = self._check(losses, timesteps)
        return self._keep_mask(l, t).to(losses.device)

    def _keep_mask(self, l: Tensor, t: Tensor) -> Tensor:
        # l: bank dtype/device, finite; t: int64 in range (checked by the caller)
        return self.ratio * l >= self.bank[t]

    @torch.no_grad()
    def update(self, losses: Tensor, timesteps: Tensor) -> None:
        """Sequential-in-batch-order exponential update of the bank."""
        l, t = self._check(losses, timesteps)
        self._update(l, t)

    def _update(self, l: Tensor, t: Tensor) -> None:
        if t.numel() == 0:
            return
        rank = _rank_within_timestep(t)
        rounds = int(rank.max()) + 1  # the one device sync of an update
        beta = self.decay
        if rounds == 1:  # all timesteps distinct: one vectorised step
            self.bank[t] = beta * self.bank[t] + (1.0 - beta) * l
        else:
            # Round r updates the r-th occurrence of every timestep; samples of other
            # rounds are pointed at a scratch slot, so no data-dependent shapes (no sync).
            ext = torch.cat([self.bank, self.bank.new_zeros(1)])
            scratch = self.num_timesteps
            for r in range(rounds):
                idx = torch.where(rank == r, t, torch.full_like(t, scratch))
                ext[idx] = beta * ext[idx] + (1.0 - beta) * l
            self.bank.copy_(ext[:-1])
        self.count.index_add_(0, t, torch.ones_like(t))

    @torch.no_grad()
    def step(self, losses: Tensor, timesteps: Tensor) -> Tensor:
        """``keep_mask`` then ``update``; returns the mask."""
        keep = self.keep_mask(losses, timesteps)
        self.update(losses, timesteps)
        return keep

    def threshold(self, timesteps: Tensor) -> Tensor:
        """The loss each sample must reach to be kept: ``bank[t] / ratio``."""
        return self.bank[timesteps.to(self.bank.device).long()] / self.ratio


# ---------------------------------------------------------------------------- loss
@dataclass
class AGCStats:
    """What :func:`agc_loss` selected, for logging. Tensors are 0-d, on the loss device;
    :meth:`as_dict` converts to Python numbers (one device sync).

    ``threshold`` is the largest excluded loss for the top-k rule, and the mean bank
    threshold ``bank[t]/ratio`` over the batch for the bank rule (NaN when not defined).
    ``excluded`` counts every sample not kept, the ``nonfinite`` ones included;
    ``mean_excluded_loss`` averages the finite excluded losses (NaN when there are none).
    """

    kept: Tensor
    total: int
    threshold: Tensor
    mean_kept_loss: Tensor
    mean_excluded_loss: Tensor
    nonfinite: int = 0
    keep_mask: Optional[Tensor] = field(default=None, repr=False)

    @property
    def excluded(self) -> Tensor:
        return self.total - self.kept

    def as_dict(self) -> Dict[str, float]:
        kept = int(self.kept)
        return {
            "kept": kept,
            "excluded": self.total - kept,
            "total": self.total,
            "exclusion_rate": (self.total - kept) / self.total if self.total else 0.0,
            "threshold": float(self.threshold),
            "mean_kept_loss": float(self.mean_kept_loss),
            "mean_excluded_loss": float(self.mean_excluded_loss),
            "nonfinite": self.nonfinite,
        }


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum()
    s = torch.where(mask, values, torch.zeros_like(values)).sum()
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, float("nan")))


def _gather(process_group, *tensors: Tensor) -> Tuple[List[Tensor], int, int]:
    """All-gather ``[B_local]`` tensors of possibly different lengths, in rank order.

    Returns (gathered tensors, this rank's offset in the global batch, world size).
    """
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    device = tensors[0].device
    n_local = torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n_local) for _ in range(world)]
    dist.all_gather(sizes, n_local, group=process_group)
    sizes_l = [int(s) for s in sizes]
    n_max = max(sizes_l)
    out = []
    for t in tensors:
        padded = t.new_zeros((n_max,))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=process_group)
        out.append(torch.cat([p[:n] for p, n in zip(parts, sizes_l)]))
    return out, sum(sizes_l[:rank]), world


def agc_loss(pred: Tensor, target: Tensor, *, timesteps: Optional[Tensor] = None,
             bank: Optional[AGCMemoryBank] = None, exclude_k: Optional[int] = None,
             exclude_fraction: Optional[float] = None,
             weight: Optional[Union[float, Tensor]] = None,
             process_group: Any = None, nonfinite: str = "raise",
             update_bank: bool = True) -> Tuple[Tensor, AGCStats]:
    """Per-sample MSE with low-loss exclusion, reduced over the kept samples.

    ``ℓ_i = w_i · mean((pred_i − target_i)²)``; keep mask ``m`` from the bank rule (when
    ``bank`` is given; needs ``timesteps``), the top-k rule (``exclude_k`` or
    ``exclude_fraction``) or none; ``L = Σ m_i ℓ_i / K`` with ``K = Σ m_i``. Excluded
    samples get exactly zero gradient; ``K = 0`` gives ``L = 0`` and zero gradients.

    The bank is fed the *unweighted* MSE (as in the reference code, which has no weights)
    and is updated after the mask is read, unless ``update_bank=False``.

    ``process_group`` (a ``torch.distributed`` group, or ``True`` for the default group):
    selection on the global batch (losses and timesteps all-gathered in rank order), the
    bank updated identically on every rank, and the local loss scaled as
    ``world · Σ_local m_i ℓ_i / K_global`` so that DDP's gradient averaging yields the
    global reduction.

    ``nonfinite``: ``"raise"`` (default) raises :class:`NonFiniteLossError` naming the
    samples; ``"exclude"`` drops them from the batch and counts them in the stats.

    Returns ``(loss, stats)``: a 0-d fp32 loss and :class:`AGCStats`.
    """
    check_float_tensor("pred", pred)
    check_float_tensor("target", target)
    check_same_shape("pred", pred, "target", target)
    if nonfinite not in ("raise", "exclude"):
        raise ValueError(f"nonfinite must be 'raise' or 'exclude', got {nonfinite!r}")
    batch = pred.shape[0]
    if batch == 0:
        raise ValueError("pred has an empty batch (B = 0)")
    use_bank = bank is not None
    use_topk = exclude_k is not None or exclude_fraction is not None
    if use_bank and use_topk:
        raise ValueError("give either bank= or exclude_k/exclude_fraction, not both")
    if use_bank:
        if not isinstance(bank, AGCMemoryBank):
            raise TypeError(f"bank must be an AGCMemoryBank, got {type(bank).__name__}")
        if timesteps is None:
            raise ValueError("bank= needs timesteps= (one integer timestep per sample)")
    if timesteps is not None:
        if not isinstance(timesteps, Tensor):
            raise TypeError(f"timesteps must be a torch.Tensor, got {type(timesteps).__name__}")
        if timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool:
            raise TypeError(f"timesteps must be an integer tensor, got {timesteps.dtype}")
        if timesteps.dim() != 1 or timesteps.shape[0] != batch:
            raise ValueError(f"timesteps must have shape [B] = [{batch}], got {tuple(timesteps.shape)}")
    w = as_weight(weight, batch, pred.device)

    mse = per_sample_mse(pred, target)               # fp32 [B], differentiable
    losses = mse if w is None else mse * w.to(mse.dtype)  # ℓ
    l_det, mse_det = losses.detach(), mse.detach()
    t_local = timesteps.to(pred.device) if timesteps is not None else None

    finite_local = torch.isfinite(l_det) & torch.isfinite(mse_det)

    # ------------------------------------------------------------- global view of the batch
    # Under data parallelism nothing may raise before the collective: a rank that raised
    # alone would leave the others blocked in all_gather. Checks run on the gathered batch,
    # identically on every rank.
    if process_group is not None:
        group = None if process_group is True else process_group
        fields = [l_det, mse_det, finite_local]
        if t_local is not None:
            fields.append(t_local.long())
        gathered, offset, world = _gather(group, *fields)
        g_l, g_mse, g_finite = gathered[0], gathered[1], gathered[2]
        g_t = gathered[3] if t_local is not None else None
    else:
        g_l, g_mse, g_finite, g_t = l_det, mse_det, finite_local, t_local
        offset, world = 0, 1
    n_bad = 0
    # One device sync for the finiteness check and the bank's timestep range.
    checks = [g_finite.all().to(torch.int64)]
    if use_bank:
        checks += [g_t.min().long(), g_t.max().long()]
    checks = torch.stack([c.to(pred.device) for c in checks]).tolist()
    if use_bank and (checks[1] < 0 or checks[2] >= bank.num_timesteps):
        raise ValueError(f"timesteps must lie in [0, {bank.num_timesteps}) for this bank, "
                         f"got values in [{checks[1]}, {checks[2]}]")
    if not checks[0]:
        bad = (~g_finite).nonzero().flatten().tolist()
        n_bad = len(bad)
        if nonfinite == "raise":
            where = "batch indices" if world == 1 else "global batch indices (rank-major)"
            raise NonFiniteLossError(
                f"non-finite per-sample loss for {n_bad} of {g_l.shape[0]} samples "
                f"({where} {bad[:16]}{' ...' if n_bad > 16 else ''}); "
                "pass nonfinite='exclude' to drop them instead"
            )
    total = g_l.shape[0]

    # ------------------------------------------------------------- selection on [B_global]
    threshold = torch.full((), float("nan"), device=pred.device)
    if use_bank:
        bdev, bdt = bank.bank.device, bank.bank.dtype
        b_mse = torch.where(g_finite, g_mse, torch.zeros_like(g_mse)).to(bdev, bdt)
        b_t = g_t.to(bdev).long()
        keep = bank._keep_mask(b_mse, b_t).to(pred.device) & g_finite
        threshold = (bank.bank[b_t] / bank.ratio).mean().to(pred.device)
        if update_bank:
            if n_bad:
                fin = g_finite.to(bdev)
                bank._update(b_mse[fin], b_t[fin])
            else:
                bank._update(b_mse, b_t)
    elif use_topk:
        n_drop = _num_excluded(total, exclude_k, exclude_fraction)
        # Non-finite samples (only present with nonfinite="exclude") rank last and are
        # removed separately, so the k lowest are always finite losses.
        ranked = torch.where(g_finite, g_l, torch.full_like(g_l, float("inf")))
        keep = low_loss_keep_mask(ranked, k=n_drop) & g_finite
        dropped = ~keep & g_finite
        if n_drop > 0:
            threshold = torch.where(dropped, g_l, torch.full_like(g_l, -float("inf"))).max()
    else:
        keep = g_finite.clone()

    kept = keep.sum()
    local_keep = keep[offset: offset + batch]
    # Mask before weighting, so excluded (possibly non-finite) samples give exact zeros to
    # pred, target and weight gradients alike.
    zero = torch.zeros_like(mse)
    safe = torch.where(local_keep, mse, zero)
    if w is not None:
        safe = torch.where(local_keep, safe * w.to(mse.dtype), zero)
    denom = kept.clamp(min=1).to(mse.dtype)
    loss = safe.sum() * (world / denom)
    stats = AGCStats(
        kept=kept,
        total=total,
        threshold=threshold,
        mean_kept_loss=_masked_mean(g_l, keep),
        mean_excluded_loss=_masked_mean(g_l, ~keep & g_finite),
        nonfinite=n_bad,
        keep_mask=local_keep,
    )
    return loss, stats
