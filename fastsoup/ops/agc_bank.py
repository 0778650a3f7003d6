"""The AGC memory bank (SPEC §1, rule 2): the per-timestep running loss bank of the
reference code, as an ``nn.Module`` whose state belongs in checkpoints.

A sample is kept iff ``ratio·ℓ ≥ bank[t]`` (the bank read before this batch updates it),
then ``bank[t] ← decay·bank[t] + (1 − decay)·ℓ`` in batch order: a vectorised update that
reproduces the sequential one exactly. :func:`fastsoup.ops.agc.agc_loss` uses it.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ._checks import NonFiniteLossError, check_timestep_tensor, is_compiling, timestep_range_error


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


BANK_DTYPES = (torch.float32, torch.float64)


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
    Its dtype is float32 (or float64) whatever the losses' dtype: a float16 bank would
    overflow to inf above 65504 and then keep nothing, so a module-wide ``.half()`` or
    ``.to(torch.bfloat16)`` leaves it in float32. ``load_state_dict`` refuses a state that
    is not finite and non-negative (``bank``) or not non-negative integers (``count``),
    or has the wrong shape: such a bank would silently exclude every later sample.

    Timesteps are integers in ``[0, num_timesteps)``. For continuous timesteps (flow
    matching), bin them first (:func:`fastsoup.train.flow_matching_bank_timesteps`).
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
        if dtype not in BANK_DTYPES:
            raise TypeError(
                f"dtype must be torch.float32 or torch.float64 for an AGC bank, got {dtype} "
                "(float16/bfloat16 overflow or round away the running losses, integers "
                "cannot hold them); the losses may have any float dtype"
            )
        self.num_timesteps = int(num_timesteps)
        self.ratio = float(ratio)
        self.decay = float(decay)
        self.register_buffer("bank", torch.zeros(num_timesteps, dtype=dtype, device=device))
        self.register_buffer("count", torch.zeros(num_timesteps, dtype=torch.int64, device=device))

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, ratio={self.ratio}, decay={self.decay}"

    def _apply(self, fn, *args, **kwargs):
        # Module-wide casts (model.half(), model.to(torch.bfloat16)) reach this buffer too;
        # keep it in a dtype that can hold it, on whatever device fn chose.
        before = self.bank
        out = super()._apply(fn, *args, **kwargs)
        if self.bank.dtype not in BANK_DTYPES:  # the values before the cast, on the new device
            self.bank = before.to(device=self.bank.device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        for name, floating in (("bank", True), ("count", False)):
            key = prefix + name
            if key in state_dict:
                self._check_state(key, state_dict[key], floating)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def _check_state(self, key: str, value: Any, floating: bool) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"{key} must be a torch.Tensor, got {type(value).__name__}")
        if value.shape != (self.num_timesteps,):
            return  # torch reports the size mismatch (RuntimeError, every key at once)
        if floating:
            if not value.dtype.is_floating_point:
                raise TypeError(f"{key} must be a float tensor, got {value.dtype}")
            v = value.detach().double()
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{key} must be finite, got NaN or infinity at timesteps "
                                 f"{(~torch.isfinite(v)).nonzero().flatten().tolist()[:16]}: "
                                 "such a bank keeps no sample at those timesteps ever again")
            if bool((v < 0).any()):
                raise ValueError(f"{key} must be non-negative (it averages losses), got "
                                 f"{float(v.min())}")
            if self.bank.dtype != torch.float64 and float(v.max()) > torch.finfo(self.bank.dtype).max:
                raise ValueError(f"{key} has values above the range of {self.bank.dtype}")
        else:
            if value.dtype.is_floating_point or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{key} must be an integer tensor, got {value.dtype}")
            if bool((value < 0).any()):
                raise ValueError(f"{key} must be non-negative (it counts updates), got "
                                 f"{int(value.min())}")

    def _check(self, losses: Tensor, timesteps: Tensor,
               rounds: bool = False) -> Tuple[Tensor, Tensor, int]:
        """Checked ``(losses, timesteps, rounds)`` on the bank's device; one host sync for
        every data-dependent check (finite losses, timesteps in range, and with
        ``rounds`` the number of update rounds)."""
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise ValueError("losses must be a [B] tensor")
        if not losses.dtype.is_floating_point:
            raise TypeError(f"losses must be a floating tensor, got {losses.dtype}")
        check_timestep_tensor("timesteps", timesteps, losses.shape[0])
        timesteps = timesteps.to(self.bank.device).long()
        losses = losses.detach().to(device=self.bank.device, dtype=self.bank.dtype)
        n_rounds = 1
        if timesteps.numel() and not is_compiling():
            checks = [torch.isfinite(losses).all().to(torch.int64), timesteps.min(),
                      timesteps.max()]
            if rounds:
                checks.append(_rank_within_timestep(timesteps).max() + 1)
            values = torch.stack(checks).tolist()  # the one device sync
            err = timestep_range_error("timesteps", values[1], values[2], 0,
                                       self.num_timesteps, f"[0, {self.num_timesteps}) for this bank")
            if err is not None:
                raise err
            if not values[0]:
                raise NonFiniteLossError(
                    "losses contain NaN or infinity: they would poison the bank for their "
                    "timesteps (drop them first; agc_loss(nonfinite='exclude') does)"
                )
            if rounds:
                n_rounds = values[3]
        elif timesteps.numel():
            n_rounds = timesteps.numel()  # traced: a static bound (extra rounds are no-ops)
        return losses, timesteps, n_rounds

    @torch.no_grad()
    def keep_mask(self, losses: Tensor, timesteps: Tensor) -> Tensor:
        """Boolean ``[B]``: ``ratio·ℓ_i ≥ bank[t_i]`` with the current (pre-update) bank."""
        l, t, _ = self._check(losses, timesteps)
        return self._keep_mask(l, t).to(losses.device)

    def _keep_mask(self, l: Tensor, t: Tensor) -> Tensor:
        # l: bank dtype/device, finite; t: int64 in range (checked by the caller)
        return self.ratio * l >= self.bank[t]

    @torch.no_grad()
    def update(self, losses: Tensor, timesteps: Tensor) -> None:
        """Sequential-in-batch-order exponential update of the bank."""
        l, t, rounds = self._check(losses, timesteps, rounds=True)
        self._update(l, t, rounds)

    def _update(self, l: Tensor, t: Tensor, rounds: int, valid: Optional[Tensor] = None) -> None:
        """Update from ``l``/``t`` (bank dtype and device, checked); ``rounds`` bounds the
        number of samples sharing a timestep (from the caller's one sync, or the batch
        size while compiling); samples where ``valid`` is False are skipped."""
        if t.numel() == 0:
            return
        beta = self.decay
        if rounds == 1 and valid is None:  # all timesteps distinct: one vectorised step
            self.bank[t] = beta * self.bank[t] + (1.0 - beta) * l
            self.count.index_add_(0, t, torch.ones_like(t))
            return
        # Round r updates the r-th occurrence of every timestep; samples of other rounds
        # (and skipped ones) are pointed at a scratch slot: no data-dependent shapes.
        scratch = self.num_timesteps
        if valid is not None:
            t = torch.where(valid, t, torch.full_like(t, scratch))
        rank = _rank_within_timestep(t)
        ext = torch.cat([self.bank, self.bank.new_zeros(1)])
        for r in range(rounds):
            idx = torch.where(rank == r, t, torch.full_like(t, scratch))
            ext[idx] = beta * ext[idx] + (1.0 - beta) * l
        self.bank.copy_(ext[:-1])
        counts = torch.zeros(scratch + 1, dtype=self.count.dtype, device=self.count.device)
        counts.index_add_(0, t, torch.ones_like(t))
        self.count.add_(counts[:-1])

    @torch.no_grad()
    def step(self, losses: Tensor, timesteps: Tensor) -> Tensor:
        """``keep_mask`` then ``update``; returns the mask (one host sync)."""
        l, t, rounds = self._check(losses, timesteps, rounds=True)
        keep = self._keep_mask(l, t).to(losses.device)
        self._update(l, t, rounds)
        return keep

    def threshold(self, timesteps: Tensor) -> Tensor:
        """The loss each sample must reach to be kept: ``bank[t] / ratio``.

        ``timesteps``: integer ``[B]`` tensor in ``[0, num_timesteps)`` (checked as
        :func:`agc_loss` checks them: one host sync)."""
        check_timestep_tensor("timesteps", timesteps)
        t = timesteps.to(self.bank.device).long()
        if t.numel() and not is_compiling():
            lo, hi = torch.stack([t.min(), t.max()]).tolist()
            err = timestep_range_error("timesteps", lo, hi, 0, self.num_timesteps,
                                       f"[0, {self.num_timesteps}) for this bank")
            if err is not None:
                raise err
        return self.bank[t] / self.ratio
