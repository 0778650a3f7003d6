"""Test set-up.

Without a GPU, Triton kernels run under the Triton interpreter: ``TRITON_INTERPRET=1``
must be set before any ``@triton.jit`` function is created, so it is set here, before
fastsoup's kernel modules are imported. Tests marked ``cuda`` are skipped without a GPU
(run them with ``pytest -m cuda`` on a GPU machine).
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAS_TRITON = False


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_device():
    """Device on which Triton kernels run here: CUDA, or the CPU under the interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")
