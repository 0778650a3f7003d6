"""Which implementation of an op runs: ``reference`` (PyTorch), ``triton`` or ``cuda``.

Policy, per op and per call (the device of the inputs decides):

* CPU tensors run the PyTorch reference, unless the Triton interpreter is active
  (``TRITON_INTERPRET=1``) and ``triton`` was requested explicitly: that is how the Triton
  kernels are tested on machines without a GPU.
* CUDA tensors run the op's default GPU backend (``DEFAULT_GPU`` below, chosen by
  benchmark), falling back to the other GPU backend and then to the reference when one is
  unavailable.

Overrides, strongest first: :func:`use_backend` (a context manager, for tests and
benchmarks), then the ``FASTSOUP_BACKEND`` environment variable, either one name for
every op (``FASTSOUP_BACKEND=cuda``) or a comma list of ``op=name`` pairs
(``FASTSOUP_BACKEND=per_sample_mse=cuda,weighted_sum=triton``). An override that cannot
be honoured (unavailable backend, unknown name) warns once and falls back;
:func:`explain` and ``fastsoup info`` say what runs and why.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import torch

BACKENDS = ("reference", "triton", "cuda")

# op name -> backends it implements, and the GPU default among them.
OPS: Dict[str, tuple] = {}
DEFAULT_GPU: Dict[str, str] = {}
CPU_NOTE: Dict[str, str] = {}

_local = threading.local()
_warned: set = set()


def register_op(name: str, backends: tuple, default_gpu: str, cpu_note: str = "") -> None:
    """Declare an op's implementations (called by each ``fastsoup.ops`` module).

    ``cpu_note`` describes an op's own CPU fast path inside its "reference" backend
    (e.g. a ``fastsoup._C`` kernel), for ``fastsoup info``.
    """
    assert default_gpu in backends and "reference" in backends
    OPS[name] = tuple(backends)
    DEFAULT_GPU[name] = default_gpu
    if cpu_note:
        CPU_NOTE[name] = cpu_note


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple:
    """(available: bool, reason: str) for running Triton kernels at all."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if interpreter_active():
        return True, "triton interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton on the CPU)"
    return True, f"triton {triton.__version__}"


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def cuda_status() -> tuple:
    """(available: bool, reason: str) for the compiled CUDA extension."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    from .kernels import _ext

    if _ext.cuda_ext(warn=True) is None:
        return False, f"fastsoup._cuda not loaded ({_ext.load_error('_cuda')})"
    return True, "fastsoup._cuda extension"


def _parse_env() -> Dict[str, str]:
    _register_all()
    raw = os.environ.get("FASTSOUP_BACKEND", "").strip()
    mapping, problems = _parse_backend_spec(raw, tuple(sorted(OPS)))
    for problem in problems:
        if problem not in _warned:
            _warned.add(problem)
            warnings.warn(f"fastsoup: {problem}; ignoring it", RuntimeWarning, stacklevel=5)
    return mapping


@functools.lru_cache(maxsize=16)
def _parse_backend_spec(raw: str, ops: tuple) -> tuple:
    """``FASTSOUP_BACKEND`` text -> ({op or "*": backend}, [problems]); ``ops`` are the
    registered op names (part of the cache key)."""
    out: Dict[str, str] = {}
    problems = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            op, name = (x.strip() for x in part.split("=", 1))
            if op not in ops:
                problems.append(f"FASTSOUP_BACKEND names an unknown op {op!r} "
                                f"(ops: {', '.join(sorted(OPS))})")
                continue
        else:
            op, name = "*", part
        if name not in BACKENDS:
            problems.append(f"FASTSOUP_BACKEND: unknown backend {name!r} "
                            f"(expected one of {', '.join(BACKENDS)})")
            continue
        out[op] = name
    return out, problems


_all_registered = False


def _register_all() -> None:
    """Every op registers itself when its module is imported; ``import fastsoup`` loads
    them on first use, so readers of the registry import them first (once)."""
    global _all_registered
    if not _all_registered:
        from . import ops  # noqa: F401

        _all_registered = True


def backend_env_problems() -> list:
    """Problems found in ``FASTSOUP_BACKEND`` (for ``fastsoup info``)."""
    _register_all()
    raw = os.environ.get("FASTSOUP_BACKEND", "").strip()
    return list(_parse_backend_spec(raw, tuple(sorted(OPS)))[1])


@contextlib.contextmanager
def use_backend(name: str, op: str = "*") -> Iterator[None]:
    """Force ``name`` for ``op`` (or every op) inside the ``with`` block (thread-local)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (expected one of {BACKENDS})")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append((op, name))
    try:
        yield
    finally:
        stack.pop()


def _requested(op: str) -> tuple:
    for scope, name in reversed(getattr(_local, "stack", None) or []):
        if scope in ("*", op):
            return name, "use_backend()"
    env = _parse_env()
    if op in env:
        return env[op], f"FASTSOUP_BACKEND={os.environ['FASTSOUP_BACKEND']}"
    if "*" in env:
        return env["*"], f"FASTSOUP_BACKEND={os.environ['FASTSOUP_BACKEND']}"
    return None, ""


def _available(name: str, device_type: str) -> tuple:
    if name == "reference":
        return True, "PyTorch reference"
    if name == "triton":
        ok, why = triton_status()
        if ok and device_type != "cuda" and not interpreter_active():
            return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
        if ok and device_type == "cuda" and interpreter_active():
            return False, "TRITON_INTERPRET=1 is set; the interpreter runs on CPU tensors"
        return ok, why
    if name == "cuda":
        if device_type != "cuda":
            return False, "the CUDA kernels need CUDA tensors"
        return cuda_status()
    raise AssertionError(name)


@dataclass(frozen=True)
class Choice:
    op: str
    backend: str
    reason: str


def choose(op: str, device: torch.device | str) -> Choice:
    """The backend that runs ``op`` on tensors of ``device``, with the reason."""
    if op not in OPS:
        _register_all()
    if op not in OPS:
        raise KeyError(f"unknown fastsoup op {op!r}")
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    requested, source = _requested(op)
    ignored = ""
    if requested is not None:
        if requested not in OPS[op]:
            why = f"{op} has no {requested} implementation"
        else:
            ok, why = _available(requested, device_type)
            if ok:
                return Choice(op, requested, f"requested by {source}")
        _warn_once(op, requested, why)
        ignored = f" ({requested} requested by {source} but unavailable: {why})"
    if device_type != "cuda":
        what = CPU_NOTE.get(op, "the PyTorch reference") if device_type == "cpu" else "the PyTorch reference"
        return Choice(op, "reference", f"{device_type} tensors use {what}{ignored}")
    default = DEFAULT_GPU[op]
    order = [default] + [b for b in ("triton", "cuda") if b != default and b in OPS[op]]
    reasons = []
    for name in order:
        ok, why = _available(name, device_type)
        if ok:
            note = "default GPU backend" if name == default else "fallback"
            extra = f" ({'; '.join(reasons)})" if reasons else ""
            return Choice(op, name, f"{note}: {why}{extra}{ignored}")
        reasons.append(f"{name} unavailable: {why}")
    return Choice(op, "reference", "; ".join(reasons) + ignored)


def _warn_once(op: str, name: str, why: str) -> None:
    key = (op, name, why)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"fastsoup: backend {name!r} requested for {op} cannot run here ({why}); "
        "using the next-best backend",
        RuntimeWarning,
        stacklevel=4,
    )


def explain(device: Optional[str] = None) -> Dict[str, Choice]:
    """Backend choice for every registered op on ``device`` (default: cuda if present)."""
    _register_all()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {op: choose(op, device) for op in sorted(OPS)}
