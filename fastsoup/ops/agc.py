"""Low-loss exclusion ("anti-gradient control", SPEC §1).

Memorised training images reach unusually low loss; AGC removes the lowest-loss samples
of each batch from the gradient (zero gradient, never gradient ascent). Three rules act
on the detached ``[B]`` loss vector:

* top-k: drop the ``k`` lowest losses (or ``floor(fraction·B)``), ties broken by batch
  index (lower index dropped first): :func:`low_loss_keep_mask`;
* the AGC memory bank of the reference code: :class:`AGCMemoryBank`
  (:mod:`fastsoup.ops.agc_bank`);
* none: every sample kept.

:func:`agc_loss` combines the fused per-sample loss, a rule and the reduction
``L = Σ m_i ℓ_i / K`` (``L = 0`` with zero gradients when ``K = 0``), optionally across
data-parallel ranks.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import (NonFiniteLossError, as_weight, check_float_tensor, check_same_shape, check_timestep_tensor,
                      is_compiling, timestep_range_error)
from ._distributed import comm_device, exchange_header, resolve_group
from .agc_bank import AGCMemoryBank, _rank_within_timestep
from .mse import per_sample_mse


# ---------------------------------------------------------------------------- top-k rule
def _num_excluded(batch: int, k: Optional[int], fraction: Optional[float],
                 k_name: str = "k", fraction_name: str = "fraction") -> int:
    """How many samples the top-k rule drops from a batch of ``batch``; errors name the
    caller's arguments (``k_name``, ``fraction_name``)."""
    if k is not None and fraction is not None:
        raise ValueError(f"give either {k_name} or {fraction_name}, not both")
    if k is not None:
        if isinstance(k, bool):
            raise TypeError(f"{k_name} must be an int, got bool")
        try:
            k = operator.index(k)  # int, numpy integers, 0-d integer tensors
        except TypeError:
            raise TypeError(f"{k_name} must be an int, got {type(k).__name__}") from None
        if k < 0:
            raise ValueError(f"{k_name} must be >= 0, got {k}")
        if batch > 0 and k >= batch:
            raise ValueError(
                f"{k_name}={k} would exclude the whole batch of B={batch} samples "
                f"(need {k_name} < B)"
            )
        return k
    if fraction is not None:
        if isinstance(fraction, bool):
            raise TypeError(f"{fraction_name} must be a number in [0, 1), got bool")
        try:
            fraction = float(fraction)
        except (TypeError, ValueError):
            raise TypeError(f"{fraction_name} must be a number in [0, 1), got "
                            f"{type(fraction).__name__}") from None
        if not (0.0 <= fraction < 1.0) or math.isnan(fraction):
            raise ValueError(f"{fraction_name} must be in [0, 1), got {fraction}")
        # floor(fraction·B), robust to binary rounding (0.29·100 is 28.999…98 in floats,
        # 1/3·3 is 0.99…9); the allowance must never reach B: fraction < 1 means k < B.
        return min(int(math.floor(fraction * batch + 1e-9)), max(batch - 1, 0))
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
    if not is_compiling() and torch.isnan(losses).any():  # NaN sorts last while compiling
        raise NonFiniteLossError("losses contain NaN: cannot rank them")
    return _drop_lowest(losses, n_drop)


def _drop_lowest(losses: Tensor, n_drop: int) -> Tensor:
    """The keep mask without the ``n_drop`` lowest of NaN-free ``losses`` (no host sync)."""
    keep = torch.ones(losses.shape[0], dtype=torch.bool, device=losses.device)
    order = torch.sort(losses.detach(), stable=True).indices  # ties keep index order
    keep[order[:n_drop]] = False
    return keep


# ---------------------------------------------------------------------------- loss
@dataclass
class AGCStats:
    """What :func:`agc_loss` selected, for logging. Tensors are 0-d, on the loss device;
    :meth:`as_dict` converts to Python numbers (one device sync).

    ``threshold`` is the largest excluded loss for the top-k rule, and the mean bank
    threshold ``bank[t]/ratio`` over the batch for the bank rule (NaN when not defined).
    ``excluded`` counts every sample not kept, the ``nonfinite`` ones included;
    ``mean_excluded_loss`` averages the finite excluded losses (NaN when there are none;
    :meth:`as_dict` logs 0 then, next to the counts). ``nonfinite`` is an int (a 0-d
    tensor under ``torch.compile``).
    """

    kept: Tensor
    total: int
    threshold: Tensor
    mean_kept_loss: Tensor
    mean_excluded_loss: Tensor
    nonfinite: Union[int, Tensor] = 0
    keep_mask: Optional[Tensor] = field(default=None, repr=False)

    @property
    def excluded(self) -> Tensor:
        return self.total - self.kept

    def as_dict(self) -> Dict[str, float]:
        """Python numbers for a logger (one device sync). Means and thresholds that are
        undefined (no sample excluded, none kept, no rule) are logged as ``0.0``, never
        NaN: the ``kept``/``excluded`` counts say which were empty."""
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.kept.device)
                              for v in (self.kept, self.threshold, self.mean_kept_loss,
                                        self.mean_excluded_loss, self.nonfinite)]).tolist()
        kept = int(values[0])
        clean = [0.0 if math.isnan(v) else v for v in values[1:4]]
        return {
            "kept": kept,
            "excluded": self.total - kept,
            "total": self.total,
            "exclusion_rate": (self.total - kept) / self.total if self.total else 0.0,
            "threshold": clean[0],
            "mean_kept_loss": clean[1],
            "mean_excluded_loss": clean[2],
            "nonfinite": int(values[4]),
        }


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum()
    s = torch.where(mask, values, torch.zeros_like(values)).sum()
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, float("nan")))


def _gather(group, sizes: List[int], *tensors: Tensor) -> List[Tensor]:
    """All-gather ``[B_local]`` tensors of the ranks' ``sizes``, in rank order."""
    import torch.distributed as dist

    n_max = max(sizes)
    out = []
    for t in tensors:
        padded = t.new_zeros((n_max,))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([p[:n] for p, n in zip(parts, sizes)]))
    return out


_WARNED_SMALL_BATCH = False

SMALL_BATCH_ADVICE = (
    "exclude_fraction={fraction} of a batch of B={batch} excludes nothing "
    "(floor({fraction}·{batch}) = 0). At small per-device batches, select on the global "
    "batch (process_group=True under DDP/accelerate: the fraction then applies to all "
    "ranks' samples together) or use the AGC memory bank (bank=fs.AGCMemoryBank(...), "
    "the reference rule, which works at any batch size). This warning is shown once."
)


def _warn_small_batch(fraction: float, batch: int) -> None:
    global _WARNED_SMALL_BATCH
    if not _WARNED_SMALL_BATCH:
        _WARNED_SMALL_BATCH = True
        warnings.warn(SMALL_BATCH_ADVICE.format(fraction=fraction, batch=batch), UserWarning,
                      stacklevel=3)


# configuration bits of the distributed header: ranks must agree on them
_SIG_BANK, _SIG_TOPK, _SIG_TIMESTEPS = 1, 2, 4


def _check_agc_args(pred, target, timesteps, bank, exclude_k, exclude_fraction, weight,
                    nonfinite) -> Optional[Tensor]:
    """Every check of :func:`agc_loss` that needs no data (shapes, types, arguments);
    returns the per-sample weight. Runs before any collective."""
    check_float_tensor("pred", pred)
    check_float_tensor("target", target)
    check_same_shape("pred", pred, "target", target)
    if nonfinite not in ("raise", "exclude"):
        raise ValueError(f"nonfinite must be 'raise' or 'exclude', got {nonfinite!r}")
    batch = pred.shape[0]
    if batch == 0:
        raise ValueError("pred has an empty batch (B = 0)")
    use_topk = exclude_k is not None or exclude_fraction is not None
    if bank is not None and use_topk:
        raise ValueError("give either bank= or exclude_k/exclude_fraction, not both")
    if use_topk:  # types and ranges of the arguments (k < B is checked on the global batch)
        _num_excluded(0, exclude_k, exclude_fraction, "exclude_k", "exclude_fraction")
    if bank is not None:
        if not isinstance(bank, AGCMemoryBank):
            raise TypeError(f"bank must be an AGCMemoryBank, got {type(bank).__name__}")
        if timesteps is None:
            raise ValueError("bank= needs timesteps= (one integer timestep per sample)")
    if timesteps is not None:
        check_timestep_tensor("timesteps", timesteps, batch)
    return as_weight(weight, batch, pred.device)


def fail_on_every_rank(process_group: Any, error: BaseException, like: Any = None,
                       op: str = "agc_loss") -> None:
    """Report ``error`` to the ranks of ``process_group`` that are entering
    :func:`agc_loss` in this step, and raise it here: every rank raises it in the same step.

    For a caller that validates its own arguments before calling ``agc_loss`` with
    ``process_group`` (as :func:`fastsoup.train.diffusion_loss` does): on an error, call
    this instead of raising, so the other ranks are not left waiting in the collective.
    ``like``: a tensor on the device the collectives use (default: CPU/NCCL's device).
    """
    group = resolve_group(process_group)
    exchange_header(group, comm_device(group, like), (), error, op)
    raise error  # not reached: exchange_header raises on every rank


def agc_loss(pred: Tensor, target: Tensor, *, timesteps: Optional[Tensor] = None,
             bank: Optional[AGCMemoryBank] = None, exclude_k: Optional[int] = None,
             exclude_fraction: Optional[float] = None,
             weight: Optional[Union[float, Tensor]] = None,
             process_group: Any = None, nonfinite: str = "raise",
             update_bank: bool = True) -> Tuple[Tensor, AGCStats]:
    """Per-sample MSE with low-loss exclusion, reduced over the kept samples.

    ``ℓ_i = w_i · mean((pred_i − target_i)²)``; keep mask ``m`` from the bank rule (when
    ``bank`` is given; needs ``timesteps``), the top-k rule (``exclude_k`` or
    ``exclude_fraction``: ``floor(exclude_fraction·B)``, which is 0 at small batches, e.g.
    0.1 of 4: a warning says so once; see ``process_group`` or use the bank) or none;
    ``L = Σ m_i ℓ_i / K`` with ``K = Σ m_i``. Excluded samples get exactly zero
    gradient; ``K = 0`` gives ``L = 0`` and zero gradients.

    The bank is fed the *unweighted* MSE (as in the reference code, which has no weights)
    and is updated after the mask is read, unless ``update_bank=False``.

    ``process_group`` (a ``torch.distributed`` group, or ``True`` for the default group):
    selection on the global batch (losses and timesteps all-gathered in rank order), the
    bank updated identically on every rank, and the local loss scaled as
    ``world · Σ_local m_i ℓ_i / K_global`` so that DDP's gradient averaging yields the
    global reduction. Every check whose outcome can differ between ranks (an empty batch,
    shapes, a missing ``timesteps``, the configuration itself, non-finite losses,
    timesteps outside the bank) is agreed across ranks first: all ranks raise the same
    error in the same step, none is left waiting in a collective.

    ``nonfinite``: ``"raise"`` (default) raises :class:`NonFiniteLossError` naming the
    samples; ``"exclude"`` drops them from the batch and counts them in the stats.

    Host syncs: one per call (the finiteness and timestep-range checks and the bank's
    update rounds, in one transfer); under ``process_group`` one more for the agreement
    header. Under ``torch.compile`` the loss compiles in one graph (``fullgraph=True``):
    the data-dependent checks are skipped while tracing (they need a host sync); shapes,
    dtypes and arguments are still checked at trace time, non-finite losses never reach
    the bank, and with ``nonfinite="raise"`` they stay in the loss (a NaN/inf loss, as
    ``F.mse_loss`` would give) instead of raising. ``process_group`` is not traceable.

    Returns ``(loss, stats)``: a 0-d fp32 loss and :class:`AGCStats`.
    """
    use_bank = bank is not None
    use_topk = exclude_k is not None or exclude_fraction is not None
    group = resolve_group(process_group) if process_group is not None else None
    if process_group is None:
        w = _check_agc_args(pred, target, timesteps, bank, exclude_k, exclude_fraction,
                            weight, nonfinite)
        sizes, offset, world = [pred.shape[0]], 0, 1
    else:
        # Nothing may raise on one rank alone: the others would wait in the collective.
        error, w = None, None
        try:
            w = _check_agc_args(pred, target, timesteps, bank, exclude_k, exclude_fraction,
                                weight, nonfinite)
        except (TypeError, ValueError) as exc:
            error = exc
        signature = (_SIG_BANK * use_bank + _SIG_TOPK * use_topk
                     + _SIG_TIMESTEPS * (timesteps is not None))
        n_local = pred.shape[0] if error is None else 0
        rows = exchange_header(group, comm_device(group, pred),
                               (n_local, signature, bank.num_timesteps if use_bank else 0),
                               error, "agc_loss")
        if len({(r[2], r[3]) for r in rows}) > 1:
            raise ValueError(
                "the ranks of process_group called agc_loss with different rules: "
                + "; ".join(f"rank {i}: bank={'yes' if r[2] & _SIG_BANK else 'no'}"
                            f"{f' ({r[3]} timesteps)' if r[2] & _SIG_BANK else ''}, "
                            f"exclude_k/exclude_fraction={'yes' if r[2] & _SIG_TOPK else 'no'}, "
                            f"timesteps={'yes' if r[2] & _SIG_TIMESTEPS else 'no'}"
                            for i, r in enumerate(rows)))
        import torch.distributed as dist

        sizes = [r[1] for r in rows]
        rank = dist.get_rank(group)
        offset, world = sum(sizes[:rank]), len(sizes)
    batch = pred.shape[0]
    compiling = is_compiling()

    mse = per_sample_mse(pred, target)               # fp32 [B], differentiable
    losses = mse if w is None else mse * w.to(mse.dtype)  # ℓ
    l_det, mse_det = losses.detach(), mse.detach()
    t_local = timesteps.to(pred.device) if timesteps is not None else None

    finite_local = torch.isfinite(l_det) & torch.isfinite(mse_det)

    # ------------------------------------------------------------- global view of the batch
    # Checks on data run on the gathered batch, identically on every rank.
    if process_group is not None:
        fields = [l_det, mse_det, finite_local]
        if t_local is not None:
            fields.append(t_local.long())
        gathered = _gather(group, sizes, *fields)
        g_l, g_mse, g_finite = gathered[0], gathered[1], gathered[2]
        g_t = gathered[3] if t_local is not None else None
    else:
        g_l, g_mse, g_finite, g_t = l_det, mse_det, finite_local, t_local
    total = g_l.shape[0]
    if use_bank:
        b_t = g_t.to(bank.bank.device).long()

    n_bad: Union[int, Tensor] = 0
    rounds = total
    if compiling:
        n_bad = (~g_finite).sum()
    else:
        # One device sync for the finiteness check, the bank's timestep range and the
        # number of update rounds of the bank.
        checks = [g_finite.all().to(torch.int64)]
        if use_bank:
            checks += [b_t.min().to(pred.device), b_t.max().to(pred.device),
                       (_rank_within_timestep(b_t).max() + 1).to(pred.device)]
        checks = torch.stack(checks).tolist()
        if use_bank:
            err = timestep_range_error("timesteps", checks[1], checks[2], 0, bank.num_timesteps,
                                       f"[0, {bank.num_timesteps}) for this bank")
            if err is not None:
                raise err
            rounds = checks[3]
        if not checks[0]:
            bad = (~g_finite).nonzero().flatten().tolist()
            n_bad = len(bad)
            if nonfinite == "raise":
                where = "batch indices" if world == 1 else "global batch indices (rank-major)"
                raise NonFiniteLossError(
                    f"non-finite per-sample loss for {n_bad} of {total} samples "
                    f"({where} {bad[:16]}{' ...' if n_bad > 16 else ''}); "
                    "pass nonfinite='exclude' to drop them instead"
                )

    # ------------------------------------------------------------- selection on [B_global]
    threshold = torch.full((), float("nan"), device=pred.device)
    if use_bank:
        bdev, bdt = bank.bank.device, bank.bank.dtype
        b_mse = torch.where(g_finite, g_mse, torch.zeros_like(g_mse)).to(bdev, bdt)
        keep = bank._keep_mask(b_mse, b_t).to(pred.device) & g_finite
        threshold = (bank.bank[b_t] / bank.ratio).mean().to(pred.device)
        if update_bank:
            skip = compiling or n_bad  # non-finite samples never reach the bank
            bank._update(b_mse, b_t, rounds, valid=g_finite.to(bdev) if skip else None)
    elif use_topk:
        n_drop = _num_excluded(total, exclude_k, exclude_fraction, "exclude_k", "exclude_fraction")
        if exclude_fraction is not None and n_drop == 0 and float(exclude_fraction) > 0:
            _warn_small_batch(float(exclude_fraction), total)
        # Non-finite samples (only present with nonfinite="exclude") rank last and are
        # removed separately, so the k lowest are always finite losses.
        ranked = torch.where(g_finite, g_l, torch.full_like(g_l, float("inf")))
        keep = _drop_lowest(ranked, n_drop) & g_finite  # ranked has no NaN
        dropped = ~keep & g_finite
        if n_drop > 0:
            threshold = torch.where(dropped, g_l, torch.full_like(g_l, -float("inf"))).max()
    else:
        keep = g_finite.clone()
    if compiling and nonfinite == "raise":
        # not raised while tracing: non-finite samples stay in the loss, which shows it
        keep = keep | ~g_finite

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
