"""fastsoup ops: one module per op family (reference, autograd wiring, registration)."""
from .agc import AGCMemoryBank, AGCStats, NonFiniteLossError, agc_loss, low_loss_keep_mask
from .mse import per_sample_mse

__all__ = [
    "AGCMemoryBank", "AGCStats", "NonFiniteLossError", "agc_loss", "low_loss_keep_mask",
    "per_sample_mse",
]
