"""Agreement across data-parallel ranks: an error on one rank is an error on every rank.

An op that takes ``process_group=`` runs collectives. If one rank raised (an empty
batch, a shape mismatch, a missing argument) before the collective while the others
entered it, they would block until the process group's timeout (30 minutes by default),
or worse pair this step's collective with the failed rank's next one. So every check
whose outcome can differ between ranks runs locally first, and its outcome travels in a
small integer header that every rank all-gathers before any other collective
(:func:`exchange_header`): when any rank reports an error, every rank raises the same
exception in the same step. The header also carries the local batch size (the ops need
it anyway) and a signature of the call's configuration, so ranks that disagree (a bank
on one rank only, say) raise instead of pairing mismatched collectives.

Cost: one all-gather of ``world × HEADER_LEN`` int64 values and one host sync per call;
the error path adds one ``all_gather_object`` (messages).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

HEADER_LEN = 4  # error flag, local batch size, configuration signature, one size setting



def _exception_types() -> dict:
    """Exception types re-raised by name on the other ranks (anything else: RuntimeError)."""
    from ._checks import NonFiniteLossError

    return {cls.__name__: cls for cls in (ValueError, TypeError, NonFiniteLossError,
                                          IndexError, FloatingPointError, RuntimeError)}


def resolve_group(process_group: Any):
    """``True`` means the default group (``None`` for torch.distributed)."""
    return None if process_group is True else process_group


def comm_device(group, like: Any) -> torch.device:
    """The device collectives of ``group`` use: that of ``like`` when it is a tensor,
    else the current CUDA device for NCCL and the CPU otherwise."""
    if isinstance(like, torch.Tensor):
        return like.device
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_header(group, device: torch.device, values: Sequence[int],
                    error: Optional[BaseException], op: str) -> List[List[int]]:
    """All-gather ``[error flag, *values]`` (``HEADER_LEN`` int64s) from every rank.

    Returns the rows in rank order. If any rank passes an ``error``, every rank raises:
    the exception of the lowest failing rank, same type and message, with the rank named
    (the failing rank chains its own exception). Every rank of ``group`` must call this
    the same number of times, which is what makes the agreement work.
    """
    import torch.distributed as dist

    values = list(values) + [0] * (HEADER_LEN - 1 - len(values))
    head = torch.tensor([1 if error is not None else 0] + [int(v) for v in values],
                        dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    parts = [torch.empty_like(head) for _ in range(world)]
    dist.all_gather(parts, head, group=group)
    rows = torch.stack(parts).tolist()  # the one host sync of the agreement
    if any(r[0] for r in rows):
        raise_on_every_rank(group, error, op, world)
    return rows


def raise_on_every_rank(group, error: Optional[BaseException], op: str, world: int) -> None:
    """Second half of the error path: exchange the messages, then raise on every rank."""
    import torch.distributed as dist

    mine = None if error is None else (type(error).__name__, str(error)[:4000], op)
    everyone: List[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
    rank, (name, message, op) = failed[0]  # the failing rank's op names the call
    cls = _exception_types().get(name, RuntimeError)
    others = f"; ranks {[r for r, _ in failed]} failed" if len(failed) > 1 else ""
    exc = cls(f"{message} [{op}: raised on rank {rank} of {world}{others}; every rank of "
              "the process group raises this error in the same step]")
    if error is not None:
        raise exc from error
    raise exc
