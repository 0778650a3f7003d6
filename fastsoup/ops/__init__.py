"""fastsoup ops: one module per op family, each reading reference → backend table →
registration → public function.

* :mod:`.mse` (per-sample MSE) and :mod:`.agc` (exclusion rules, the AGC bank, ``agc_loss``);
* :mod:`.weighted_sum` (multi-tensor weighted sum);
* ambient diffusion: :mod:`.ambient` (losses), :mod:`.consistency`, :mod:`.reverse_step`,
  over :mod:`.ambient_coefficients` (per-sample tables) and :mod:`.rows` (row engines);
* shared: :mod:`.schedule` (alphas_cumprod, timesteps, VP coefficients), :mod:`._checks`
  (argument validation), :mod:`._registration` (the custom-op pair and its eager twin).

Ops call :mod:`fastsoup.kernels` and nothing of ``merge`` or ``train``.
"""
from .agc import AGCMemoryBank, AGCStats, NonFiniteLossError, agc_loss, low_loss_keep_mask
from .ambient import ambient_loss_ve, ambient_loss_vp
from .consistency import consistency_loss, consistency_loss_eps
from .mse import per_sample_mse
from .reverse_step import vp_reverse_step, vp_reverse_step_from_eps
from .schedule import ReverseStepCoefficients, vp_alpha_sigma, vp_reverse_step_coefficients
from .weighted_sum import weighted_sum_

__all__ = [
    "AGCMemoryBank", "AGCStats", "NonFiniteLossError", "agc_loss", "low_loss_keep_mask",
    "per_sample_mse",
    "ambient_loss_vp", "ambient_loss_ve", "consistency_loss", "consistency_loss_eps",
    "ReverseStepCoefficients", "vp_alpha_sigma", "vp_reverse_step",
    "vp_reverse_step_coefficients", "vp_reverse_step_from_eps", "weighted_sum_",
]
