"""Loading of the optional compiled extensions.

``fastsoup._C`` (pybind11 CPU kernels) and ``fastsoup._cuda`` (CUDA kernels) are both
optional at import time. A failure to load gives a single warning naming the problem and
the caller falls back to the next-best implementation; it never raises on import.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

_cache: dict = {}
_errors: dict = {}


def _load(name: str, warn: bool):
    if name in _cache:
        return _cache[name]
    module = None
    try:
        module = importlib.import_module(f"fastsoup.{name}")
    except ImportError as exc:
        _errors[name] = f"{type(exc).__name__}: {exc}"
        if warn:
            warnings.warn(
                f"fastsoup: the compiled extension fastsoup.{name} could not be loaded "
                f"({_errors[name]}); falling back to the next-best backend. Reinstall with "
                f"`pip install --no-build-isolation -e .` to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
    _cache[name] = module
    return module


def cpu_ext(warn: bool = True):
    """The pybind11 CPU extension, or None (with one warning) if it is unavailable."""
    return _load("_C", warn)


def cuda_ext(warn: bool = False):
    """The CUDA extension, or None. Not built on machines without CUDA, so no warning by
    default; ``fastsoup info`` reports why it is missing."""
    return _load("_cuda", warn)


def load_error(name: str) -> Optional[str]:
    return _errors.get(name)
