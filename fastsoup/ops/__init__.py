"""fastsoup ops: one module per op family (reference, autograd wiring, registration)."""
from .agc import AGCMemoryBank, AGCStats, NonFiniteLossError, agc_loss, low_loss_keep_mask
from .ambient import (
    ReverseStepCoefficients, ambient_loss_ve, ambient_loss_vp, vp_alpha_sigma,
    vp_reverse_step, vp_reverse_step_coefficients, vp_reverse_step_from_eps,
)
from .consistency import consistency_loss, consistency_loss_eps
from .mse import per_sample_mse

__all__ = [
    "AGCMemoryBank", "AGCStats", "NonFiniteLossError", "agc_loss", "low_loss_keep_mask",
    "per_sample_mse",
    "ambient_loss_vp", "ambient_loss_ve", "consistency_loss", "consistency_loss_eps",
    "ReverseStepCoefficients", "vp_alpha_sigma", "vp_reverse_step",
    "vp_reverse_step_coefficients", "vp_reverse_step_from_eps",
]
