"""fastsoup.train: the diffusers-facing training layer (SPEC §§1–4).

* :mod:`~fastsoup.train.losses`: the loss from a diffusers scheduler's outputs
  (prediction type, min-SNR-γ, flow matching, AGC / top-k exclusion);
* :mod:`~fastsoup.train.difftuning`: Diff-Tuning batch mixing, built on
  :mod:`~fastsoup.train.timestep_samplers` (the power-law timestep distributions, the
  batch split) and :mod:`~fastsoup.train.knowledge_bank` (samples of the pre-trained model,
  stored, loaded and replayed);
* :mod:`~fastsoup.train.ambient`: ambient-diffusion batches and the early-stopped sampler;
* :mod:`~fastsoup.train.fixed_noise`: one fixed noise draw per example (``FixedNoise``,
  ``AmbientDataset``), the data the ambient helpers wrap;
* :mod:`~fastsoup.train.iet`: iterative ensemble training (replica averaging in one
  process or across shard groups of ranks);
* :mod:`~fastsoup.train.soup`: saving shard models and souping them with ``fs.merge``;
* :mod:`~fastsoup.train.data`: small built-in procedural datasets, the image-folder loader,
  image grids and a small UNet (demo, examples, tests).

The core package never imports diffusers; these helpers duck-type the scheduler.
"""
from .losses import diffusion_loss, diffusion_target
from .schedulers import (
    FLOW_MATCHING,
    PREDICTION_TYPES,
    WEIGHTING_SCHEMES,
    compute_snr,
    flow_matching_bank_timesteps,
    flow_matching_loss_weights,
    min_snr_loss_weights,
    prediction_type_of,
    scheduler_family,
)
from .timestep_samplers import PowerLawTimestepSampler, power_law_timestep_probs, split_batch
from .knowledge_bank import KNOWLEDGE_BANK_FORMAT, KnowledgeBank
from .difftuning import DiffTuning, DiffTuningBatch
from .ambient import (
    AmbientVPBatch,
    ambient_vp_batch,
    ambient_vp_dataset,
    corrupt_batch,
    sample_early_stop,
)
from .iet import IterativeEnsemble, average_across_shard_groups, averaged_tensors, shard_weights
from .soup import save_shard_models, soup_shard_models
from . import data  # noqa: E402  (fs.train.data: built-in procedural datasets)

__all__ = [
    "FLOW_MATCHING",
    "PREDICTION_TYPES",
    "WEIGHTING_SCHEMES",
    "compute_snr",
    "diffusion_loss",
    "diffusion_target",
    "flow_matching_bank_timesteps",
    "flow_matching_loss_weights",
    "min_snr_loss_weights",
    "prediction_type_of",
    "scheduler_family",
    "KNOWLEDGE_BANK_FORMAT",
    "DiffTuning",
    "DiffTuningBatch",
    "KnowledgeBank",
    "PowerLawTimestepSampler",
    "power_law_timestep_probs",
    "split_batch",
    "AmbientVPBatch",
    "ambient_vp_batch",
    "ambient_vp_dataset",
    "corrupt_batch",
    "sample_early_stop",
    "IterativeEnsemble",
    "average_across_shard_groups",
    "averaged_tensors",
    "shard_weights",
    "save_shard_models",
    "soup_shard_models",
    "data",
]
