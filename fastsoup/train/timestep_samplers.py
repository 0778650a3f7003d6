"""Diff-Tuning's timestep distributions and batch split (SPEC §4).

Fine-tuning forgets most at high noise and least near ``t = 0``, so Diff-Tuning draws the
timesteps of its two sub-batches from two power laws over ``t = 0 … T−1``:

* ``P_adapt(t) ∝ (t + 1)^τ`` for the target data (reconsolidation, large ``t``);
* ``P_retain(t) ∝ (T − t)^τ`` for the knowledge-bank samples (retention, small ``t``).

:func:`power_law_timestep_probs` gives the probabilities, :class:`PowerLawTimestepSampler`
draws from them (or turns them into per-sample loss weights on uniform timesteps) and
:func:`split_batch` divides a batch into target and replay rows (32 → 26 + 6).
:class:`fastsoup.train.difftuning.DiffTuning` puts them together.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import check_int, check_nonnegative, check_timesteps

__all__ = ["power_law_timestep_probs", "PowerLawTimestepSampler", "split_batch"]

KINDS = ("retain", "adapt")


def power_law_timestep_probs(kind: str, num_train_timesteps: int = 1000, tau: float = 1.0) -> Tensor:
    """Normalised timestep probabilities of Diff-Tuning, float64 ``[T]``.

    ``kind="retain"``: ``P(t) ∝ (T − t)^τ`` (favours small ``t``: knowledge bank);
    ``kind="adapt"``: ``P(t) ∝ (t + 1)^τ`` (favours large ``t``: target data);
    ``t = 0 … T−1``. ``τ = 0`` is the uniform distribution. Every ``t`` has ``P(t) > 0``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    T = check_int("num_train_timesteps", num_train_timesteps, 1)
    tau = check_nonnegative("tau", tau)
    t = torch.arange(T, dtype=torch.float64)
    base = (T - t) if kind == "retain" else (t + 1)
    w = base ** tau
    return w / w.sum()


class PowerLawTimestepSampler:
    """Draws timesteps from ``P_retain`` or ``P_adapt`` (:func:`power_law_timestep_probs`).

    Args:
        kind: ``"retain"`` or ``"adapt"``.
        num_train_timesteps: ``T`` (the scheduler's ``config.num_train_timesteps``).
        tau: the exponent ``τ ≥ 0`` (default 1).

    Attributes:
        probs: float64 ``[T]`` probabilities (CPU).
    """

    def __init__(self, kind: str, num_train_timesteps: int = 1000, tau: float = 1.0) -> None:
        self.probs = power_law_timestep_probs(kind, num_train_timesteps, tau)
        self.kind = kind
        self.num_train_timesteps = num_train_timesteps
        self.tau = float(tau)

    def __repr__(self) -> str:
        return (f"PowerLawTimestepSampler(kind={self.kind!r}, "
                f"num_train_timesteps={self.num_train_timesteps}, tau={self.tau})")

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               device: Optional[Union[str, torch.device]] = None) -> Tensor:
        """``n`` i.i.d. timesteps, int64 ``[n]`` on ``device`` (default CPU).

        Drawn on the CPU with ``torch.multinomial`` (with replacement) from ``generator``
        (a CPU ``torch.Generator``; the global RNG when ``None``), then moved: the same
        seed gives the same timesteps on every device.
        """
        check_int("n", n, 0)
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        if n == 0:
            out = torch.empty(0, dtype=torch.int64)
        else:
            out = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        return out if device is None else out.to(device)

    def loss_weights(self, timesteps: Tensor) -> Tensor:
        """Per-sample weights ``T·P(t)`` realising this distribution on *uniform* timesteps.

        For ``t ~ U{0..T−1}``, ``E[T·P(t)·ℓ(t)] = E_{t~P}[ℓ(t)]``: the weighting mode of
        Diff-Tuning (sampling is the default; this trades variance for a uniform ``t``).
        Returns float32 ``[B]`` on the device of ``timesteps`` (mean 1 over all ``t``).
        """
        check_timesteps(timesteps, one_dim=False, high=self.num_train_timesteps)
        w = self.probs * self.num_train_timesteps
        return w.to(timesteps.device)[timesteps.long()].float()


def split_batch(batch_size: int, replay_share: float = 0.2) -> Tuple[int, int]:
    """``(B_target, B_replay)`` with ``B_replay = ⌊replay_share · B⌋`` (32, 0.2 → 26, 6).

    The floor is the reference code's ``int(global_batch_size * LWF_ratio)``.
    """
    check_int("batch_size", batch_size, 1)
    if isinstance(replay_share, bool) or not isinstance(replay_share, (int, float)) \
            or not (0.0 <= replay_share < 1.0):
        raise ValueError(f"replay_share must be in [0, 1), got {replay_share!r}")
    n_replay = int(math.floor(batch_size * replay_share))
    if batch_size - n_replay < 1:
        raise ValueError(f"batch_size={batch_size} with replay_share={replay_share} leaves no "
                         "target samples")
    return batch_size - n_replay, n_replay
