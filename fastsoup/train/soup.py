"""Souping from training: save shard models in diffusers layout, merge them with the
streaming engine (``fs.merge``)."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

from torch import nn


def save_shard_models(models: Sequence[nn.Module], folder: str) -> List[str]:
    """Save each model to ``folder/shard_<k>`` and return the paths.

    diffusers models (anything with ``save_pretrained``) are saved in their own layout
    (``config.json`` + ``diffusion_pytorch_model.safetensors``); other modules as
    ``model.safetensors`` of their ``state_dict``.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, model in enumerate(models):
        path = os.path.join(folder, f"shard_{k}")
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(path, safe_serialization=True)
        else:
            os.makedirs(path, exist_ok=True)
            state = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
            save_file(state, os.path.join(path, "model.safetensors"))
        paths.append(path)
    return paths


def soup_shard_models(paths: Sequence[str], output: str, weights: Optional[Sequence[float]] = None,
                      **merge_options):
    """``θ_S = Σ_i w_i θ_i`` of saved shard models into ``output`` (same layout, configs
    copied) with :func:`fastsoup.merge`; returns its report."""
    from .. import merge as _merge

    return _merge(list(paths), output, weights=list(weights) if weights is not None else None,
                  **merge_options)
