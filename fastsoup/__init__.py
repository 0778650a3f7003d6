"""fastsoup: fused kernels and a streaming merge engine for diffusion-model training and
merging (anti-gradient control, ambient diffusion, Diff-Tuning, Diffusion Soup).

The public API (SPEC §6) is re-exported here flat: ``import fastsoup as fs``.
"""
from ._version import __version__
from ._backend import use_backend
from .ops import (
    AGCMemoryBank,
    AGCStats,
    NonFiniteLossError,
    agc_loss,
    low_loss_keep_mask,
    per_sample_mse,
    ambient_loss_vp,
    ambient_loss_ve,
    consistency_loss,
    consistency_loss_eps,
    ReverseStepCoefficients,
    vp_alpha_sigma,
    vp_reverse_step,
    vp_reverse_step_coefficients,
    vp_reverse_step_from_eps,
)
from .ops.weighted_sum import weighted_sum_
from . import merge  # callable: fs.merge(inputs, output, weights=None, **options)
from .merge import HeaderError, MergeError, MergeReport, PlanError
from . import train  # the diffusers-facing training layer: fs.train.diffusion_loss, ...

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
