"""Iterative ensemble training (IET, SPEC §2).

``S`` shard models start from the same weights; each trains on its own data shard; every
round their weights are averaged, ``θ̄ = Σ_k (n_k / N) θ_k`` over parameters and floating
buffers, and **every shard model restarts from θ̄**. Optimizer state, learning-rate
schedules and AGC banks stay per shard (they are not model tensors and are not touched).
Integer buffers (``num_batches_tracked`` and the like) are left as they are.

Two scales:

* :class:`IterativeEnsemble`: the replicas live in one process. Averaging is one call of
  the multi-tensor :func:`fastsoup.weighted_sum_` over the whole parameter list (one
  kernel launch per dtype on a GPU), written into the first replica and copied to the
  others with ``torch._foreach_copy_``.
* :func:`average_across_shard_groups`: one shard per group of ``torch.distributed``
  ranks (``world = shards × ranks_per_shard``, shard ``s`` on ranks
  ``s·R … s·R + R − 1``). Each rank pre-scales its replica by ``w_s / R`` and one fp32
  all-reduce (bucketed) sums over the world, so every rank ends with θ̄.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops.weighted_sum import weighted_sum_

__all__ = ["IterativeEnsemble", "averaged_tensors", "shard_weights", "average_across_shard_groups"]


def shard_weights(shard_sizes: Optional[Sequence[int]], num_shards: int) -> List[float]:
    """``n_k / N`` from shard sizes (equal weights when ``None``)."""
    if shard_sizes is None:
        return [1.0 / num_shards] * num_shards
    sizes = [float(n) for n in shard_sizes]
    if len(sizes) != num_shards:
        raise ValueError(f"shard_sizes has {len(sizes)} entries for {num_shards} shard models")
    if any(n < 0 for n in sizes) or sum(sizes) <= 0:
        raise ValueError(f"shard_sizes must be non-negative with a positive total, got {list(shard_sizes)}")
    total = sum(sizes)
    return [n / total for n in sizes]


def averaged_tensors(model: nn.Module) -> List[Tuple[str, Tensor]]:
    """The tensors IET averages, in a fixed order: parameters, then floating buffers."""
    out = [(name, p) for name, p in model.named_parameters()]
    out += [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
    return out


def _check_same_structure(lists: Sequence[List[Tuple[str, Tensor]]]) -> None:
    ref = lists[0]
    for k, other in enumerate(lists[1:], start=1):
        if len(other) != len(ref):
            raise ValueError(f"model {k} has {len(other)} averaged tensors, model 0 has {len(ref)}")
        for (n0, t0), (n1, t1) in zip(ref, other):
            if n0 != n1 or t0.shape != t1.shape or t0.dtype != t1.dtype or t0.device != t1.device:
                raise ValueError(
                    f"models 0 and {k} differ at {n0!r}: {n1!r} {tuple(t1.shape)} {t1.dtype} "
                    f"{t1.device} vs {tuple(t0.shape)} {t0.dtype} {t0.device}"
                )


class IterativeEnsemble:
    """Shard replicas in one process, averaged every ``average_every`` calls of :meth:`step`.

    Args:
        models: the ``S`` shard models (same architecture, dtypes and devices).
        shard_sizes: examples per shard (weights ``n_k / N``); ``None`` for a plain mean.
        ema_models: optional EMA copies, one per shard, averaged the same way (separately).
        average_every: :meth:`step` averages after this many calls (0: only explicit
            :meth:`average_` calls).

    Example::

        iet = IterativeEnsemble(models, shard_sizes=[len(d) for d in shards], average_every=2000)
        for step in range(total_steps):
            for k in range(S):
                train_one_step(models[k], optimizers[k], banks[k], next(loaders[k]))
            iet.step()          # averages every 2000 steps; optimizers/banks untouched
    """

    def __init__(self, models: Sequence[nn.Module], shard_sizes: Optional[Sequence[int]] = None,
                 ema_models: Optional[Sequence[nn.Module]] = None, average_every: int = 0):
        models = list(models)
        if len(models) < 1:
            raise ValueError("IterativeEnsemble needs at least one model")
        if ema_models is not None and len(ema_models) != len(models):
            raise ValueError(f"ema_models has {len(ema_models)} entries for {len(models)} models")
        if average_every < 0:
            raise ValueError(f"average_every must be >= 0, got {average_every}")
        self.models = models
        self.ema_models = list(ema_models) if ema_models is not None else None
        self.weights = shard_weights(shard_sizes, len(models))
        self.average_every = int(average_every)
        self.steps = 0
        self.rounds = 0
        _check_same_structure([averaged_tensors(m) for m in models])
        if self.ema_models is not None:
            _check_same_structure([averaged_tensors(m) for m in self.ema_models])

    @torch.no_grad()
    def _average_group(self, models: Sequence[nn.Module]) -> None:
        lists = [[t for _, t in averaged_tensors(m)] for m in models]
        outs = lists[0]
        weighted_sum_(outs, lists, self.weights)  # in place into replica 0
        for other in lists[1:]:
            torch._foreach_copy_(other, outs)

    def average_(self) -> None:
        """Average now: θ̄ into every shard model (and every EMA copy)."""
        self._average_group(self.models)
        if self.ema_models is not None:
            self._average_group(self.ema_models)
        self.rounds += 1

    def step(self) -> bool:
        """Count one training step; average when the round ends. Returns True if it did."""
        self.steps += 1
        if self.average_every and self.steps % self.average_every == 0:
            self.average_()
            return True
        return False

    def state_dict(self) -> Dict[str, object]:
        return {"steps": self.steps, "rounds": self.rounds, "weights": list(self.weights),
                "average_every": self.average_every}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if len(state["weights"]) != len(self.models):
            raise ValueError("state_dict was saved for a different number of shard models")
        self.steps = int(state["steps"])
        self.rounds = int(state["rounds"])
        self.weights = [float(w) for w in state["weights"]]
        self.average_every = int(state["average_every"])


@torch.no_grad()
def average_across_shard_groups(model: nn.Module, shard_index: int, num_shards: int,
                                shard_sizes: Optional[Sequence[int]] = None,
                                group=None, bucket_bytes: int = 64 * 2**20) -> None:
    """Replace ``model``'s tensors by the shard average over all ranks of ``group``.

    The ``group`` (default: the world) holds ``num_shards`` shard groups of equal size
    ``R``; ranks of one shard group hold identical replicas (data parallel inside the
    group). Each rank contributes ``w_s / R · θ`` and a bucketed fp32 all-reduce sums
    them; the result is rounded once into the model's dtypes. Every rank must call this
    with the same ``num_shards`` and ``shard_sizes``.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if num_shards <= 0 or world % num_shards:
        raise ValueError(f"the group's {world} ranks do not split into {num_shards} equal shard groups")
    if not (0 <= shard_index < num_shards):
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    ranks_per_shard = world // num_shards
    scale = shard_weights(shard_sizes, num_shards)[shard_index] / ranks_per_shard
    tensors = [t for _, t in averaged_tensors(model)]
    # Buckets of tensors on one device, flattened into fp32 (exact accumulation).
    bucket: List[Tensor] = []
    size = 0

    def flush():
        nonlocal bucket, size
        if not bucket:
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in bucket])
        flat.mul_(scale)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset: offset + n].view_as(t))
            offset += n
        bucket, size = [], 0

    for t in tensors:
        if bucket and (t.device != bucket[0].device or size + 4 * t.numel() > bucket_bytes):
            flush()
        bucket.append(t)
        size += 4 * t.numel()
    flush()
