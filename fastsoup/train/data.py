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


IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")


def load_image_folder(folder: str, resolution: int) -> Tensor:
    """Every image below ``folder`` (.png/.jpg/.jpeg/.webp, recursively, sorted by path),
    RGB, resized to ``resolution`` (bicubic): float32 ``[N, 3, resolution, resolution]`` in
    ``[-1, 1]``. Needs Pillow. Raises ``ValueError`` naming the folder or the bad file."""
    import glob
    import os

    from PIL import Image

    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a directory")
    paths = sorted(p for ext in IMAGE_SUFFIXES
                   for p in glob.glob(os.path.join(folder, "**", f"*.{ext}"), recursive=True))
    if not paths:
        raise ValueError(f"no images ({', '.join('.' + e for e in IMAGE_SUFFIXES)}) found under {folder}")
    out = torch.empty(len(paths), 3, resolution, resolution)
    for i, p in enumerate(paths):
        try:
            img = Image.open(p).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        except Exception as exc:  # Pillow raises several types for unreadable files
            raise ValueError(f"cannot read image {p}: {exc}") from None
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        out[i] = x.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1
    return out


def image_grid(rows: List[Tensor], scale: int = 4, gutter: int = 2) -> Tensor:
    """Rows of ``[n, 3, H, W]`` images in ``[-1, 1]`` as one uint8 ``[rows·H', cols·W', 3]``
    grid (white gutters, shorter rows padded, each pixel repeated ``scale`` times)."""
    n = max(r.shape[0] for r in rows)
    _, _, h, w = rows[0].shape
    H, W = h * scale, w * scale
    grid = torch.full((len(rows) * (H + gutter) + gutter, n * (W + gutter) + gutter, 3), 255,
                      dtype=torch.uint8)
    for i, row in enumerate(rows):
        imgs = ((row.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        imgs = imgs.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        for j in range(row.shape[0]):
            y0, x0 = gutter + i * (H + gutter), gutter + j * (W + gutter)
            grid[y0:y0 + H, x0:x0 + W] = imgs[j].permute(1, 2, 0)
    return grid


def save_image_grid(rows: List[Tensor], path: str, scale: int = 4) -> None:
    """:func:`image_grid` written as a PNG (needs Pillow)."""
    from PIL import Image

    Image.fromarray(image_grid(rows, scale).numpy()).save(path)


def small_unet(resolution: int, width: int = 32, attention: bool = True):
    """A small diffusers ``UNet2DModel`` for RGB images (3 levels, one layer each; an
    attention block at the middle level unless ``attention=False``). ``width`` is the
    base channel count (a multiple of 8)."""
    from diffusers import UNet2DModel

    mid_down = "AttnDownBlock2D" if attention else "DownBlock2D"
    mid_up = "AttnUpBlock2D" if attention else "UpBlock2D"
    return UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(width, 2 * width, 2 * width), norm_num_groups=8,
                       down_block_types=("DownBlock2D", mid_down, "DownBlock2D"),
                       up_block_types=("UpBlock2D", mid_up, "UpBlock2D"))
