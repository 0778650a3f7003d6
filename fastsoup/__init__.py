"""fastsoup: fused kernels and a streaming merge engine for diffusion-model training and
merging (anti-gradient control, ambient diffusion, Diff-Tuning, Diffusion Soup).

The public API (SPEC §6) is re-exported here flat: ``import fastsoup as fs``.

Names are loaded on first use (PEP 562): ``import fastsoup`` imports neither torch nor
numpy. The ops (``fs.per_sample_mse``, ``fs.weighted_sum_``, ``fs.use_backend``, ...) and
``fs.train`` import torch when first touched; ``fs.merge`` and its errors do not (the CPU
merge path runs without torch), so ``fastsoup-merge --help`` starts in a fraction of a
second.
"""
import importlib as _importlib

from ._version import __version__

# public name -> the module that defines it (relative to this package)
_LAZY = {
    "use_backend": "._backend",
    "AGCMemoryBank": ".ops",
    "AGCStats": ".ops",
    "NonFiniteLossError": ".ops",
    "agc_loss": ".ops",
    "low_loss_keep_mask": ".ops",
    "per_sample_mse": ".ops",
    "ambient_loss_vp": ".ops",
    "ambient_loss_ve": ".ops",
    "consistency_loss": ".ops",
    "consistency_loss_eps": ".ops",
    "ReverseStepCoefficients": ".ops",
    "vp_alpha_sigma": ".ops",
    "vp_reverse_step": ".ops",
    "vp_reverse_step_coefficients": ".ops",
    "vp_reverse_step_from_eps": ".ops",
    "weighted_sum_": ".ops.weighted_sum",
    "MergeReport": ".merge.report",
    "MergeError": ".merge.errors",
    "PlanError": ".merge.errors",
    "HeaderError": ".merge.errors",
}
# subpackages reachable as attributes (``fs.merge`` is callable: fs.merge(inputs, output))
_SUBMODULES = ("merge", "train", "ops", "io", "kernels")

__all__ = [
    "__version__",
    "use_backend",
    "AGCMemoryBank",
    "AGCStats",
    "NonFiniteLossError",
    "agc_loss",
    "low_loss_keep_mask",
    "per_sample_mse",
    "ambient_loss_vp",
    "ambient_loss_ve",
    "consistency_loss",
    "consistency_loss_eps",
    "ReverseStepCoefficients",
    "vp_alpha_sigma",
    "vp_reverse_step",
    "vp_reverse_step_coefficients",
    "vp_reverse_step_from_eps",
    "weighted_sum_",
    "merge",
    "MergeReport",
    "MergeError",
    "PlanError",
    "HeaderError",
    "train",
]


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is not None:
        value = getattr(_importlib.import_module(where, __name__), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f".{name}", __name__)
    else:  # AttributeError lets ``from fastsoup import demo`` import the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
