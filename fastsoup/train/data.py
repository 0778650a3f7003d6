"""Small procedural image datasets, built in: no download, deterministic, distinct styles.

Each style is a family of RGB images in ``[-1, 1]`` (``[N, 3, size, size]`` float32):
``stripes``, ``rings``, ``checker``, ``blobs`` and ``gradient``. One style per data shard
gives shard models that visibly differ, which makes souping and memorisation easy to see.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

STYLES = ("stripes", "rings", "checker", "blobs", "gradient")


def _palette(g: torch.Generator, n: int) -> Tensor:
    return torch.rand(n, 3, 1, 1, generator=g) * 2 - 1


def _grid(size: int) -> Tuple[Tensor, Tensor]:
    ax = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return torch.meshgrid(ax, ax, indexing="ij")


def procedural_images(style: str, n: int, size: int = 16, seed: int = 0) -> Tensor:
    """``n`` images of ``style``: float32 ``[n, 3, size, size]`` in ``[-1, 1]``."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r} (expected one of {STYLES})")
    if n < 0 or size < 4:
        raise ValueError(f"need n >= 0 and size >= 4, got n={n}, size={size}")
    g = torch.Generator().manual_seed(seed * 1000 + STYLES.index(style))
    y, x = _grid(size)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        c0, c1 = _palette(g, 2)
        r = torch.rand(6, generator=g)
        if style == "stripes":
            theta, freq, phase = r[0] * math.pi, 1.5 + 2.5 * r[1], r[2] * 2 * math.pi
            m = torch.sin(2 * math.pi * freq * (x * torch.cos(theta) + y * torch.sin(theta)) + phase)
        elif style == "rings":
            cx, cy, freq = 0.2 + 0.6 * r[0], 0.2 + 0.6 * r[1], 2 + 3 * r[2]
            m = torch.sin(2 * math.pi * freq * torch.sqrt((x - cx) ** 2 + (y - cy) ** 2))
        elif style == "checker":
            cells = 2 + int(r[0] * 4)
            m = ((torch.floor(x * cells + r[1]) + torch.floor(y * cells + r[2])) % 2) * 2 - 1
        elif style == "blobs":
            m = -torch.ones_like(x)
            for _ in range(3):
                p = torch.rand(3, generator=g)
                m = torch.maximum(m, 2 * torch.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2) / (0.01 + 0.03 * p[2])) - 1)
        else:  # gradient
            theta = r[0] * 2 * math.pi
            m = ((x - 0.5) * torch.cos(theta) + (y - 0.5) * torch.sin(theta)) * 2.0
        w = (m.clamp(-1, 1) + 1) / 2
        out[i] = c0 * (1 - w) + c1 * w
    return out.clamp_(-1, 1)


def shard_datasets(num_shards: int, per_shard: int, size: int = 16, seed: int = 0,
                   duplicate_fraction: float = 0.25,
                   styles: Optional[List[str]] = None) -> List[Tuple[Tensor, Tensor]]:
    """One dataset per shard, style ``k mod 5``, with a duplicated image in each.

    Returns a list of ``(images, is_duplicate)``: ``images`` float32 ``[per_shard, 3,
    size, size]``; ``is_duplicate`` bool ``[per_shard]`` marks the copies of one image
    (``round(duplicate_fraction · per_shard)`` of them, at least 2 when the fraction is
    positive): the kind of repeated training image that diffusion models memorise.
    """
    if num_shards < 1 or per_shard < 2:
        raise ValueError(f"need num_shards >= 1 and per_shard >= 2, got {num_shards}, {per_shard}")
    if not (0.0 <= duplicate_fraction < 1.0):
        raise ValueError(f"duplicate_fraction must be in [0, 1), got {duplicate_fraction}")
    styles = list(styles or STYLES)
    out = []
    for k in range(num_shards):
        images = procedural_images(styles[k % len(styles)], per_shard, size, seed=seed + k)
        n_dup = 0 if duplicate_fraction == 0 else max(2, round(duplicate_fraction * per_shard))
        n_dup = min(n_dup, per_shard)
        is_dup = torch.zeros(per_shard, dtype=torch.bool)
        if n_dup:
            images[:n_dup] = images[0]
            is_dup[:n_dup] = True
        out.append((images, is_dup))
    return out


def nearest_neighbour_rms(samples: Tensor, train: Tensor, chunk: int = 256) -> Tensor:
    """RMS distance (per pixel) from each sample to its nearest training image: ``[S]``.

    A simple memorisation measure: copies of a training image score near 0.
    """
    s = samples.reshape(samples.shape[0], -1).float()
    t = train.reshape(train.shape[0], -1).float()
    best = torch.full((s.shape[0],), float("inf"))
    for i in range(0, t.shape[0], chunk):
        d = torch.cdist(s, t[i: i + chunk]).min(dim=1).values
        best = torch.minimum(best, d.cpu())
    return best / math.sqrt(s.shape[1])
