from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """About how many programs keep ``device`` busy for a bandwidth-bound kernel."""
    if device.type == "cuda":
        return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: few programs keep tests fast but still exercise chunking


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current while launching (Triton launches on the current device)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_device_of(pick):
    """Decorator: run a launcher with the GPU of ``pick(*args)`` current."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with device_guard(pick(*args)):
                return fn(*args, **kwargs)
        return inner
    return wrap
